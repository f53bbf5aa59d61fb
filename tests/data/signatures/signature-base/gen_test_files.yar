/* Written for imguard's tests in signature-base's convention (meta: description, author, reference,
   date, score; no tags; LOKI/THOR externals). The rule text is ours, the convention theirs. */

rule MAL_Test_EICAR_Dec26 {
   meta:
      description = "Detects the EICAR anti-virus test string (test rule in signature-base style)"
      author = "imguard tests"
      reference = "https://www.eicar.org/download-anti-malware-testfile/"
      date = "2026-12-06"
      score = 80
      id = "3f6d2c1e-0000-4000-8000-000000000001"
   strings:
      $x1 = { 58 35 4F 21 50 25 40 41 50 5B 34 5C 50 5A 58 35 34 28 50 5E 29 37 43 43 29 37 7D 24
                   45 49 43 41 52 2D 53 54 41 4E 44 41 52 44 2D 41 4E 54 49 56 49 52 55 53 2D 54 45 53
                   54 2D 46 49 4C 45 21 24 48 2B 48 2A }
   condition:
      $x1
}

rule HKTL_Test_Marker_Dec26 {
   meta:
      description = "Detects a harmless hack-tool marker string (test rule in signature-base style)"
      author = "imguard tests"
      date = "2026-12-06"
      score = 50
   strings:
      $s1 = "IMGUARD-TEST-HACKTOOL-MARKER" ascii wide
   condition:
      filesize < 100KB and $s1
}

rule SUSP_Test_Low_Score_Dec26 {
   meta:
      description = "A low-score informational match (test rule in signature-base style)"
      author = "imguard tests"
      date = "2026-12-06"
      score = 30
   strings:
      $s1 = "IMGUARD-TEST-INFO-MARKER"
   condition:
      $s1
}

rule SUSP_Test_Ext_Var_Dec26 {
   meta:
      description = "Uses the LOKI/THOR externals filename and extension (test rule in signature-base style)"
      author = "imguard tests"
      date = "2026-12-06"
      score = 75
   strings:
      $s1 = "IMGUARD-TEST-DOUBLE-EXT"
   condition:
      $s1 and extension == ".exe" and filename matches /\.pdf\.exe$/
}
