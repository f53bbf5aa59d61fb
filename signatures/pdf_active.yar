/*
 * PDF documents with active content: JavaScript, launch actions, actions run on open.
 * The header check comes first. These rules also run on the engine's decoded view of each PDF
 * (member "<pdf-decoded>": the object text with FlateDecode streams inflated, so dictionaries hidden in
 * compressed object streams are visible). Names are matched in their plain form: #xx escapes in names
 * (/J#61vaScript) are not undone.
 */
rule PDF_JavaScript : pdf_active pdf
{
    meta:
        description = "PDF containing JavaScript (/JavaScript or /JS)"
        severity = "high"
    strings:
        $pdf = "%PDF-"
        $js1 = "/JavaScript"
        $js2 = /\/JS[\s\/\(<\[]/
    condition:
        $pdf in (0..1024) and any of ($js*)
}

rule PDF_Launch_Action : pdf_active pdf
{
    meta:
        description = "PDF with a /Launch action (starts a program or opens a file)"
        severity = "high"
    strings:
        $pdf = "%PDF-"
        $launch = "/Launch"
    condition:
        $pdf in (0..1024) and $launch
}

rule PDF_OpenAction_JavaScript : pdf_active pdf
{
    meta:
        description = "PDF running JavaScript when opened (/OpenAction or /AA with JavaScript)"
        severity = "critical"
    strings:
        $pdf = "%PDF-"
        $open1 = "/OpenAction"
        $open2 = "/AA"
        $js1 = "/JavaScript"
        $js2 = /\/JS[\s\/\(<\[]/
    condition:
        $pdf in (0..1024) and any of ($open*) and any of ($js*)
}
