/* Written for imguard's tests in YARA Forge's convention (one file per package; meta normalised:
   description, author, reference, date, modified, score, quality, tags as meta, license).
   The rule text is ours, the convention theirs. */

rule IMGUARD_TESTS_MAL_Test_EICAR_Forge : FILE {
   meta:
      description = "Detects the EICAR test string (test rule in YARA Forge style)"
      author = "imguard tests"
      id = "0b6c0b1a-0000-4000-8000-000000000002"
      date = "2026-12-06"
      modified = "2026-12-06"
      reference = "https://www.eicar.org/download-anti-malware-testfile/"
      source_url = "https://example.invalid/imguard-tests"
      license_url = "N/A"
      score = 85
      quality = 80
      tags = "FILE"
   strings:
      $x1 = { 58 35 4F 21 50 25 40 41 50 5B 34 5C 50 5A 58 35 34 28 50 5E 29 37 43 43 29 37 7D 24
                   45 49 43 41 52 2D 53 54 41 4E 44 41 52 44 2D 41 4E 54 49 56 49 52 55 53 2D 54 45 53
                   54 2D 46 49 4C 45 21 24 48 2B 48 2A }
   condition:
      $x1
}

rule IMGUARD_TESTS_SUSP_Test_Marker_Forge : FILE {
   meta:
      description = "A suspicious-but-not-malicious marker (test rule in YARA Forge style)"
      author = "imguard tests"
      date = "2026-12-06"
      score = 60
      quality = 70
      tags = "FILE"
   strings:
      $s1 = "IMGUARD-TEST-FORGE-SUSPICIOUS"
   condition:
      $s1
}
