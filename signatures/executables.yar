/*
 * Native executables, by header. Conditions only (no strings): each is a few integer reads at fixed
 * offsets, so they cost nothing per scan. They fire on archive members too, since every member is scanned.
 */
rule Executable_PE : executable pe
{
    meta:
        description = "Windows PE executable (MZ header whose e_lfanew points at a PE signature)"
        severity = "medium"
    condition:
        uint16(0) == 0x5A4D and filesize >= 0x40 and
        uint32(0x3C) >= 0x40 and uint32(0x3C) <= filesize - 4 and
        uint32(uint32(0x3C)) == 0x00004550
}

rule Executable_ELF : executable elf
{
    meta:
        description = "ELF executable, shared object or object file"
        severity = "medium"
    condition:
        uint32(0) == 0x464C457F and filesize >= 52 and uint8(4) >= 1 and uint8(4) <= 2
}

rule Executable_MachO : executable macho
{
    meta:
        description = "Mach-O executable (32/64-bit, either byte order)"
        severity = "medium"
    condition:
        uint32(0) == 0xFEEDFACE or uint32(0) == 0xFEEDFACF or
        uint32(0) == 0xCEFAEDFE or uint32(0) == 0xCFFAEDFE
}

rule Executable_MachO_Fat : executable macho
{
    meta:
        description = "Mach-O universal (fat) binary; a Java class file shares the magic but has a version >= 45 there"
        severity = "medium"
    condition:
        (uint32be(0) == 0xCAFEBABE or uint32be(0) == 0xCAFEBABF) and
        uint32be(4) >= 1 and uint32be(4) < 20
}
