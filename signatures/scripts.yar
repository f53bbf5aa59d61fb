/*
 * Script droppers: code that starts programs or fetches and runs code. Strings are long enough to give
 * YARA good atoms; `nocase` only where the languages are case-insensitive (VBScript, PowerShell, HTA).
 */
rule Script_JS_Shell_Dropper : script dropper
{
    meta:
        description = "JScript creating WScript.Shell / Shell.Application through ActiveX or WScript.CreateObject"
        severity = "high"
    strings:
        $create1 = "ActiveXObject(" ascii wide
        $create2 = "WScript.CreateObject(" ascii wide
        $obj1 = "WScript.Shell" nocase ascii wide
        $obj2 = "Shell.Application" nocase ascii wide
    condition:
        filesize < 10MB and any of ($create*) and any of ($obj*)
}

rule Script_VBS_Shell_Dropper : script dropper
{
    meta:
        description = "VBScript creating WScript.Shell or Shell.Application"
        severity = "high"
    strings:
        $s1 = "CreateObject(\"WScript.Shell\")" nocase ascii wide
        $s2 = "CreateObject(\"Shell.Application\")" nocase ascii wide
    condition:
        filesize < 10MB and any of them
}

rule Script_PowerShell_Encoded_Command : script powershell
{
    meta:
        description = "PowerShell started with an encoded (base64) command line"
        severity = "high"
    strings:
        $ps = "powershell" nocase ascii wide
        $enc1 = " -enc " nocase ascii wide
        $enc2 = " -encodedcommand " nocase ascii wide
        $enc3 = " -ec " nocase ascii wide
        $enc4 = " -en " nocase ascii wide
    condition:
        filesize < 10MB and $ps and any of ($enc*)
}

rule Script_PowerShell_Download_Execute : script powershell dropper
{
    meta:
        description = "PowerShell downloading and executing code (IEX / Invoke-Expression with DownloadString)"
        severity = "high"
    strings:
        $dl1 = "DownloadString(" nocase ascii wide
        $dl2 = "DownloadData(" nocase ascii wide
        $ex1 = "IEX" ascii wide
        $ex2 = "Invoke-Expression" nocase ascii wide
        $ex3 = "iex(" nocase ascii wide
    condition:
        filesize < 10MB and any of ($dl*) and any of ($ex*)
}

rule Script_HTA_Application : script hta
{
    meta:
        description = "HTML Application (runs with full user rights in mshta.exe)"
        severity = "high"
    strings:
        $hta = "<hta:application" nocase ascii wide
    condition:
        filesize < 10MB and $hta
}

rule Script_Windows_Shortcut_LNK : script lnk
{
    meta:
        description = "Windows shortcut (LNK): header size 0x4C and the ShellLink CLSID 00021401-0000-0000-C000-000000000046"
        severity = "medium"
    condition:
        uint32(0) == 0x0000004C and uint32(4) == 0x00021401 and uint32(8) == 0 and
        uint32(12) == 0x000000C0 and uint32(16) == 0x46000000
}
