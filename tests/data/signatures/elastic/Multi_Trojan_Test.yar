/* Written for imguard's tests in the convention of Elastic's protections-artifacts (one file per
   OS_Category_Family; meta: author, id, fingerprint, creation_date, last_modified, threat_name,
   severity 0-100, arch_context, scan_context, license, os). The rule text is ours, the convention theirs. */

rule Multi_Trojan_Test_5e1c0a2b {
    meta:
        author = "imguard tests"
        id = "5e1c0a2b-0000-4000-8000-000000000003"
        fingerprint = "0000000000000000000000000000000000000000000000000000000000000003"
        creation_date = "2026-12-06"
        last_modified = "2026-12-06"
        threat_name = "Multi.Trojan.ImguardTest"
        severity = 100
        arch_context = "x86"
        scan_context = "file, memory"
        license = "test data"
        os = "multi"
    strings:
        $a = "IMGUARD-TEST-TROJAN-PAYLOAD" ascii fullword
    condition:
        all of them
}

rule Multi_EICAR_Test_9d0f1c3e {
    meta:
        author = "imguard tests"
        id = "9d0f1c3e-0000-4000-8000-000000000004"
        creation_date = "2026-12-06"
        last_modified = "2026-12-06"
        threat_name = "Multi.EICAR.Not-a-virus"
        severity = 1
        os = "multi"
    strings:
        $a = { 58 35 4F 21 50 25 40 41 50 5B 34 5C 50 5A 58 35 34 28 50 5E 29 37 43 43 29 37 7D 24
                   45 49 43 41 52 2D 53 54 41 4E 44 41 52 44 2D 41 4E 54 49 56 49 52 55 53 2D 54 45 53
                   54 2D 46 49 4C 45 21 24 48 2B 48 2A }
    condition:
        all of them
}

rule Multi_Generic_Test_2a7b4c6d {
    meta:
        author = "imguard tests"
        id = "2a7b4c6d-0000-4000-8000-000000000005"
        creation_date = "2026-12-06"
        last_modified = "2026-12-06"
        threat_name = "Multi.Generic.ImguardTest"
        severity = 50
        os = "multi"
    strings:
        $a = "IMGUARD-TEST-GENERIC-THREAT" ascii
    condition:
        all of them
}
