"""Loading signatures: compile errors as file:line, refusal of a broken set, names, version, the cache."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from imguard.inspect import EXTERNALS, SignatureError, load_signatures
from imguard.inspect import signatures as sigmod

ROOT = Path(__file__).resolve().parent.parent
GOOD = ('rule good_one : tagged {\n  meta:\n    severity = "low"\n  strings:\n    $a = "imguard test marker"\n'
        '  condition:\n    $a\n}\n')
BROKEN = 'rule fine { condition: true }\n\nrule broken {\n  condition:\n    undefined_thing\n}\n'


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_bundled_signatures_compile_without_warnings():
    signatures = load_signatures(ROOT / "signatures")
    assert signatures.warnings == ()
    expected = {"EICAR_Test_File", "eicar.EICAR_Test_File", "Executable_PE", "executables.Executable_PE",
                "Office_VBA_Project", "office_macro.Office_VBA_Project", "Script_HTA_Application",
                "pdf_active.PDF_JavaScript"}
    assert expected <= signatures.rule_names
    for name, meta in signatures.meta.items():
        assert meta.get("description") and meta.get("severity") in ("info", "low", "medium", "high", "critical"), name


def test_bundled_rules_all_have_tags():
    import yara
    for path in sorted((ROOT / "signatures").glob("*.yar")):
        for rule in yara.compile(filepath=str(path), externals=EXTERNALS):
            assert rule.tags, f"{path.name}: {rule.identifier} has no tags"


def test_rule_names_in_both_forms_and_private_rules_left_out(tmp_path):
    folder = write(tmp_path / "sigs", {"alpha.yar": GOOD + "private rule helper { condition: true }\n",
                                       "beta.yara": "rule two { condition: false }\n"})
    signatures = load_signatures(folder)
    assert signatures.rule_names == {"good_one", "alpha.good_one", "two", "beta.two"}


def test_broken_file_is_reported_as_file_line_message(tmp_path):
    folder = write(tmp_path / "sigs", {"ok.yar": GOOD, "bad.yar": BROKEN})
    with pytest.raises(SignatureError) as caught:
        load_signatures(folder)
    [error] = caught.value.errors
    assert error == f"{folder / 'bad.yar'}:5: undefined identifier \"undefined_thing\""


def test_every_broken_file_is_reported(tmp_path):
    folder = write(tmp_path / "sigs", {"a.yar": BROKEN, "b.yar": "rule x { condition: \n", "c.yar": GOOD})
    with pytest.raises(SignatureError) as caught:
        load_signatures(folder)
    files = sorted(error.split(":", 1)[0] for error in caught.value.errors)
    assert files == [str(folder / "a.yar"), str(folder / "b.yar")]
    assert all(error.split(":")[1].isdigit() for error in caught.value.errors)


def test_error_in_an_included_file_names_that_file(tmp_path):
    folder = write(tmp_path / "sigs", {"main.yar": 'include "../inc/helper.inc"\nrule m { condition: true }\n'})
    write(tmp_path / "inc", {"helper.inc": "rule h {\n condition: nope\n}\n"})
    with pytest.raises(SignatureError) as caught:
        load_signatures(folder)
    assert caught.value.errors[0].startswith(f"{folder / '..' / 'inc' / 'helper.inc'}:2: ") or \
        "helper.inc:2: " in caught.value.errors[0]


def test_signature_base_style_externals_compile(tmp_path):
    folder = write(tmp_path / "sigs", {"loki.yar": (
        'rule loki_style { condition: filename matches /\\.exe$/ and filepath contains "!" and '
        'extension == ".exe" and filetype == "EXE" and owner != "" and archive_depth >= 0 and mime != "" '
        'and protocol != "" and direction != "" and sender != "" and recipient != "" }\n')})
    assert "loki_style" in load_signatures(folder).rule_names


def test_version_is_a_short_hash_of_the_sources(tmp_path):
    folder = write(tmp_path / "sigs", {"a.yar": GOOD})
    first = load_signatures(folder).version
    assert first == load_signatures(folder).version and len(first) == 12
    (folder / "a.yar").write_text(GOOD.replace("marker", "marker2"))
    assert load_signatures(folder).version != first


def test_missing_folder_and_duplicate_namespaces(tmp_path):
    with pytest.raises(SignatureError):
        load_signatures(tmp_path / "nope")
    folder = write(tmp_path / "dup", {"same.yar": GOOD, "same.yara": "rule other { condition: true }\n"})
    with pytest.raises(SignatureError) as caught:
        load_signatures(folder)
    assert "already used" in caught.value.errors[0]


def test_empty_folder_loads_an_empty_set(tmp_path):
    signatures = load_signatures(write(tmp_path / "empty", {}))
    assert signatures.rule_names == frozenset()
    assert signatures.rules.match(data=b"x", externals=dict(EXTERNALS)) == []


# --- the compiled cache --------------------------------------------------------------------------

def big_rule_set(n: int) -> str:
    return "\n".join(f'rule r{i} {{ strings: $a = "marker-{i:06d}-xyzzy" $b = {{ 4D 5A {i % 256:02X} 90 }} '
                     f"condition: $a or ($b and filesize < 1MB) }}" for i in range(n))


def test_cache_is_used_and_fast(tmp_path):
    folder = write(tmp_path / "sigs", {"many.yar": big_rule_set(3000)})
    cache = tmp_path / "cache"
    started = time.perf_counter()
    first = load_signatures(folder, cache)
    compile_time = time.perf_counter() - started
    assert not first.from_cache and len(list(cache.glob("*.yarc"))) == 1
    started = time.perf_counter()
    second = load_signatures(folder, cache)
    load_time = time.perf_counter() - started
    assert second.from_cache
    assert second.rule_names == first.rule_names and second.version == first.version
    assert load_time < compile_time / 3, (load_time, compile_time)
    assert [m.rule for m in second.rules.match(data=b"..marker-000042-xyzzy..", externals=dict(EXTERNALS))] == ["r42"]
    assert not list(cache.glob("*.tmp"))       # written atomically: no temporary file left


def test_changed_source_invalidates_the_cache(tmp_path):
    folder = write(tmp_path / "sigs", {"a.yar": GOOD})
    cache = tmp_path / "cache"
    load_signatures(folder, cache)
    (folder / "a.yar").write_text(GOOD.replace("imguard test marker", "another marker"))
    reloaded = load_signatures(folder, cache)
    assert not reloaded.from_cache
    assert [m.rule for m in reloaded.rules.match(data=b"another marker", externals=dict(EXTERNALS))] == ["good_one"]
    assert len(list(cache.glob("*.yarc"))) == 2
    (folder / "b.yar").write_text("rule b { condition: true }\n")       # an added file too
    assert not load_signatures(folder, cache).from_cache


def test_cache_key_includes_engine_and_externals(tmp_path, monkeypatch):
    folder = write(tmp_path / "sigs", {"a.yar": GOOD})
    cache = tmp_path / "cache"
    load_signatures(folder, cache)
    monkeypatch.setattr(sigmod, "ENGINE_VERSION", "9.9.9")
    assert not load_signatures(folder, cache).from_cache
    monkeypatch.setattr(sigmod, "EXTERNALS_SCHEMA", '{"filename": "str"}')
    assert not load_signatures(folder, cache).from_cache


def test_corrupt_cache_is_recompiled(tmp_path):
    folder = write(tmp_path / "sigs", {"a.yar": GOOD})
    cache = tmp_path / "cache"
    load_signatures(folder, cache)
    [cached] = cache.glob("*.yarc")
    cached.write_bytes(b"this is not a compiled rule file")
    again = load_signatures(folder, cache)
    assert not again.from_cache
    assert [m.rule for m in again.rules.match(data=b"imguard test marker", externals=dict(EXTERNALS))] == ["good_one"]
    assert load_signatures(folder, cache).from_cache      # and the cache was rewritten


def test_broken_set_never_reaches_the_cache(tmp_path):
    folder = write(tmp_path / "sigs", {"a.yar": GOOD, "b.yar": BROKEN})
    cache = tmp_path / "cache"
    with pytest.raises(SignatureError):
        load_signatures(folder, cache)
    assert not cache.exists() or not list(cache.iterdir())


def test_bundled_signatures_folder_can_be_copied_and_loaded(tmp_path):
    copy = tmp_path / "signatures"
    shutil.copytree(ROOT / "signatures", copy)
    assert load_signatures(copy, tmp_path / "cache").version == load_signatures(ROOT / "signatures").version


# --- public rule sets: index.yar with includes, one namespace, missing modules -------------------------

PUBLIC = ROOT / "tests" / "data" / "signatures"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def matched(signatures, data: bytes) -> set[str]:
    return {f"{m.namespace}.{m.rule}" for m in signatures.rules.match(data=data, externals=dict(EXTERNALS))}


def test_index_yar_with_includes_loads_as_one_namespace_and_matches():
    """Yara-Rules: index.yar includes a folder per category, and a rule of malware/ uses a rule of utils/."""
    signatures = load_signatures(PUBLIC / "yara-rules")
    assert matched(signatures, EICAR) == {"index.Test_EICAR_String", "index.MALW_Test_EICAR_Dropper"}
    assert matched(signatures, b"IMGUARD-TEST-YARARULES") == {"index.MALW_Test_Marker"}   # via a private rule
    assert matched(signatures, b"nothing") == set()
    assert signatures.rule_names.sources == {"index.Test_EICAR_String": "utils/markers.yar:9",
                                             "index.MALW_Test_EICAR_Dropper": "malware/MALW_Test.yar:2",
                                             "index.MALW_Test_Marker": "malware/MALW_Test.yar:11"}
    assert sorted(Path(f).name for f in signatures.files) == ["MALW_Test.yar", "index.yar", "markers.yar"]
    # the category index beside index.yar is not loaded a second time (its rules would match twice)
    assert len(signatures.unused) == 1 and "malware_index.yar:0: not loaded" in signatures.unused[0]


def test_the_same_files_without_an_index_need_one_namespace(tmp_path):
    folder = write(tmp_path / "sigs", {"a_markers.yar": (PUBLIC / "yara-rules/utils/markers.yar").read_text(),
                                       "b_malware.yar": (PUBLIC / "yara-rules/malware/MALW_Test.yar").read_text()})
    with pytest.raises(SignatureError) as caught:
        load_signatures(folder)                      # one namespace per file: b cannot see a's rules
    assert any("b_malware.yar:" in e and "undefined identifier" in e for e in caught.value.errors)
    signatures = load_signatures(folder, settings=sigmod.SignatureSettings(signature_namespace="yararules"))
    assert matched(signatures, EICAR) == {"yararules.Test_EICAR_String", "yararules.MALW_Test_EICAR_Dropper"}
    assert signatures.rule_names.sources["yararules.MALW_Test_EICAR_Dropper"] == "b_malware.yar:2"


def test_index_yar_takes_the_set_namespace_when_given():
    signatures = load_signatures(PUBLIC / "yara-rules", settings=sigmod.SignatureSettings(signature_namespace="yr"))
    assert matched(signatures, EICAR) == {"yr.Test_EICAR_String", "yr.MALW_Test_EICAR_Dropper"}


def test_a_missing_module_is_reported_with_file_and_line_and_can_be_skipped(tmp_path):
    folder = PUBLIC / "modules"
    with pytest.raises(SignatureError) as caught:
        load_signatures(folder)
    assert caught.value.errors == [
        f"{(folder / 'sandbox.yar').resolve()}:3: imports module 'cuckoo', which this engine lacks (it has: "
        f"{', '.join(sigmod.MODULES)}) (--skip-missing-modules leaves such files out)"]
    skipping = sigmod.SignatureSettings(skip_missing_modules=True)
    signatures = load_signatures(folder, tmp_path / "cache", settings=skipping)
    assert matched(signatures, b"IMGUARD-TEST-MODULES-PLAIN") == {"good.Test_Plain_Marker"}
    assert len(signatures.skipped) == 1 and "sandbox.yar:3: imports module 'cuckoo'" in signatures.skipped[0]
    assert "file left out" in signatures.skipped[0]
    assert [Path(f).name for f in signatures.files] == ["good.yar"]
    cached = load_signatures(folder, tmp_path / "cache", settings=skipping)
    assert cached.from_cache and cached.skipped == signatures.skipped
    assert cached.rule_names.sources == signatures.rule_names.sources


def test_an_included_file_needing_a_missing_module_is_left_out_of_its_index(tmp_path):
    folder = write(tmp_path / "sigs", {"index.yar": 'include "./rules/plain.yar"\ninclude "./rules/mach.yar"\n'})
    write(folder / "rules", {"plain.yar": 'rule Plain { strings: $a = "plain-marker-xyz" condition: $a }\n',
                             "mach.yar": '\nimport "macho"\nrule M { condition: macho.number_of_segments > 1 }\n'})
    with pytest.raises(SignatureError) as caught:
        load_signatures(folder)
    assert len(caught.value.errors) == 1 and "mach.yar:2: imports module 'macho'" in caught.value.errors[0]
    signatures = load_signatures(folder, settings=sigmod.SignatureSettings(skip_missing_modules=True))
    assert matched(signatures, b"plain-marker-xyz") == {"index.Plain"}
    assert signatures.rule_names == {"Plain", "index.Plain"}


def test_engine_modules_are_those_of_yara_python():
    import yara
    assert set(sigmod.MODULES) == set(yara.modules)
    assert {"pe", "elf", "math", "hash", "dotnet"} <= set(sigmod.MODULES)
    assert not {"cuckoo", "magic", "dex", "macho"} & set(sigmod.MODULES)


def test_editing_an_included_file_changes_the_version_and_the_cache(tmp_path):
    folder = write(tmp_path / "sigs", {"index.yar": 'include "./rules/a.yar"\n'})
    write(folder / "rules", {"a.yar": 'rule A { strings: $a = "first-marker" condition: $a }\n'})
    first = load_signatures(folder, tmp_path / "cache")
    (folder / "rules" / "a.yar").write_text('rule A { strings: $a = "second-marker" condition: $a }\n')
    second = load_signatures(folder, tmp_path / "cache")
    assert second.version != first.version and not second.from_cache
    assert matched(second, b"second-marker") == {"index.A"} and matched(second, b"first-marker") == set()


def test_include_cycle_and_missing_include_are_errors(tmp_path):
    folder = write(tmp_path / "sigs", {"a.yar": 'include "./b.inc"\n', "b.inc": 'include "./a.yar"\n'})
    with pytest.raises(SignatureError) as caught:
        load_signatures(folder)
    assert any("include cycle" in e for e in caught.value.errors)
    folder = write(tmp_path / "other", {"a.yar": '\ninclude "./nowhere.yar"\n'})
    with pytest.raises(SignatureError) as caught:
        load_signatures(folder)
    assert "nowhere.yar: cannot read" in caught.value.errors[0]


def test_slow_rule_warnings_are_kept_with_file_and_line(tmp_path):
    folder = write(tmp_path / "sigs", {"slow.yar": 'rule ok { strings: $a = "distinctive" condition: $a }\n'
                                                   'rule slow { strings: $a = /a.*b/ condition: $a }\n'})
    signatures = load_signatures(folder)
    assert len(signatures.warnings) == 2             # ".* consider .{,N}" and "may slow down scanning"
    assert all(w.startswith(f"{(folder / 'slow.yar').resolve()}:2: ") for w in signatures.warnings)
    assert any("may slow down scanning" in w for w in signatures.warnings)


def test_an_error_in_a_nested_include_names_the_file_by_its_path(tmp_path):
    folder = write(tmp_path / "sigs", {"index.yar": 'include "./cat/all.yar"\n'})
    write(folder / "cat", {"all.yar": 'include "./deep/bad.yar"\n'})
    write(folder / "cat" / "deep", {"bad.yar": "rule A {\n condition: nope\n}\n"})
    with pytest.raises(SignatureError) as caught:
        load_signatures(folder)
    assert caught.value.errors == [f"{(folder / 'cat/deep/bad.yar').resolve()}:2: undefined identifier \"nope\""]
