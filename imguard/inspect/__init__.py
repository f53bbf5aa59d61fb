"""Inspection engine: true type, hashes, archive walking, polyglots and YARA, as a FileReport.

    signatures = load_signatures(Path("signatures"), cache_dir=Path("data/cache"))   # SignatureError if broken
    inspector = Inspector(signatures, InspectLimits())          # thread-safe: share it between workers
    report = inspector.inspect(data_or_path, ChatContext(...), name="invoice.pdf", claimed_mime="application/pdf")
    for member in report.walk(): ...                            # "invoice.zip!docs/run.exe", depth 2, findings

Findings are facts (imguard.model: yara, type_mismatch, encrypted, polyglot, limit, unsafe_path,
unscannable with a reason); policy decides. Hostile input never raises: it gives a finding.
Does not import mitmproxy: the gateway and the offline `imguard scan` call the same Inspector.
"""

from imguard.inspect.engine import Inspector
from imguard.inspect.filetype import FAMILIES
from imguard.inspect.limits import InspectLimits
from imguard.inspect.signatures import EXTERNALS, SignatureError, Signatures, load_signatures

__all__ = ["Inspector", "InspectLimits", "Signatures", "SignatureError", "load_signatures", "FAMILIES", "EXTERNALS"]
