rule Test_Plain_Marker
{
    meta:
        score = 80
    strings:
        $m = "IMGUARD-TEST-MODULES-PLAIN"
    condition:
        $m
}
