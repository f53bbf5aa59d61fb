/* Needs the cuckoo module (sandbox reports), which imguard's engine lacks. */
import "pe"
import "cuckoo"

rule Test_Needs_Cuckoo
{
    condition:
        cuckoo.network.http_request(/imguard\.invalid/)
}
