/*
 * Office documents carrying VBA macros. In OOXML (docm, xlsm, pptm) the macros live in the member
 * vbaProject.bin, an OLE compound file: the engine unzips the document and scans that member, where the
 * OLE header and the UTF-16 stream names "_VBA_PROJECT" / "VBA" are visible (the macro source itself is
 * compressed). Legacy OLE documents (doc, xls) carry the same storage inside themselves.
 */
rule Office_VBA_Project : macro office
{
    meta:
        description = "OLE file with a VBA project (vbaProject.bin, or a legacy document with macros)"
        severity = "high"
    strings:
        $vba_project = "_VBA_PROJECT" wide ascii
        $attribute = "Attribute VB_" ascii
        $vba_dir = "V\x00B\x00A\x00\x00\x00"
    condition:
        uint32be(0) == 0xD0CF11E0 and uint32be(4) == 0xA1B11AE1 and ($vba_project or ($vba_dir and $attribute))
}

rule Office_OOXML_With_VBA : macro office
{
    meta:
        description = "OOXML document (zip) whose member list names a vbaProject.bin"
        severity = "high"
    strings:
        $content_types = "[Content_Types].xml"
        $vba = "vbaProject.bin"
    condition:
        uint32(0) == 0x04034B50 and $content_types and $vba
}
