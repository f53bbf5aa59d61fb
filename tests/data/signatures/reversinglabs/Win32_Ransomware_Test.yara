/* Written for imguard's tests in the convention of ReversingLabs' reversinglabs-yara-rules (tags
   tc_detection malicious; meta: category, malware, malware_type, tc_detection_type, ...).
   The rule text is ours, the convention theirs. */

rule Win32_Ransomware_ImguardTest : tc_detection malicious
{
    meta:
        id = "7c1d2e3f-0000-4000-8000-000000000006"
        version = "1.0"
        yara_version = "3.2.0"
        status = "RELEASED"
        sharing = "TLP:WHITE"
        source = "imguard tests"
        author = "imguard tests"
        category = "MALWARE"
        malware = "IMGUARDTEST"
        malware_type = "RANSOMWARE"
        tc_detection_type = "Ransomware"
        tc_detection_name = "ImguardTest"
        tc_detection_factor = 5

    strings:
        $note = "IMGUARD-TEST-RANSOM-NOTE" ascii wide

    condition:
        $note
}
