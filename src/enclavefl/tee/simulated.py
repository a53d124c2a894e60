"""The simulated quote: what a party without a TEE reports about itself.

INSECURE: a simulated quote is a CBOR map the party writes itself. Nothing signs it, so it
proves nothing about the code, the platform or the key it names; anyone can write one with
any measurement. It exists so that the same code paths (evidence, key binding, policy) run
without hardware. Verifiers accept it only under a policy with `allow_simulated`.

Format (CBOR map, definite lengths):
    {"enclavefl-simulated-quote": 1, "tee": "simulated", "mr_enclave": bstr(32),
     "mr_signer": bstr(32), "isv_prod_id": uint16, "isv_svn": uint16, "debug": false,
     "report_data": bstr(64)}
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from enclavefl.errors import FormatError, UsageError
from enclavefl.tee.claims import Claims, TeeType
from enclavefl.tee.measure import Measurement

SIMULATED_QUOTE_MARKER = "enclavefl-simulated-quote"
SIMULATED_QUOTE_VERSION = 1
SIMULATED_TCB_STATUS = "SimulatedInsecure"
REPORT_DATA_SIZE = 64

_KEYS = frozenset(
    {
        SIMULATED_QUOTE_MARKER,
        "tee",
        "mr_enclave",
        "mr_signer",
        "isv_prod_id",
        "isv_svn",
        "debug",
        "report_data",
    }
)
_MAX_DEPTH = 16


def encode_simulated_quote(measurement: Measurement, report_data: bytes) -> bytes:
    """A simulated quote for `measurement` carrying `report_data` (exactly 64 bytes)."""
    if len(report_data) != REPORT_DATA_SIZE:
        raise UsageError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    return cbor2.dumps(
        {
            SIMULATED_QUOTE_MARKER: SIMULATED_QUOTE_VERSION,
            "tee": TeeType.SIMULATED.value,
            "mr_enclave": measurement.mr_enclave,
            "mr_signer": measurement.mr_signer,
            "isv_prod_id": measurement.isv_prod_id,
            "isv_svn": measurement.isv_svn,
            "debug": False,
            "report_data": bytes(report_data),
        }
    )


def parse_simulated_quote(data: bytes) -> Claims:
    """The claims of a simulated quote (tee SIMULATED, tcb_status "SimulatedInsecure").

    Only the format is checked: the content is self-reported and proves nothing.
    """
    quote = decode_cbor(data, what="simulated quote")
    marker = quote.get(SIMULATED_QUOTE_MARKER) if isinstance(quote, dict) else None
    if type(marker) is not int or marker != SIMULATED_QUOTE_VERSION:
        raise FormatError(f"not a simulated quote: no {SIMULATED_QUOTE_MARKER!r}: 1 marker")
    if set(quote) != _KEYS:
        raise FormatError(
            f"simulated quote fields are {sorted(map(str, quote))}, expected {sorted(_KEYS)}"
        )
    if quote["tee"] != TeeType.SIMULATED.value:
        raise FormatError(f"simulated quote tee is {quote['tee']!r}, expected 'simulated'")
    for name, size in (("mr_enclave", 32), ("mr_signer", 32), ("report_data", REPORT_DATA_SIZE)):
        if not isinstance(quote[name], bytes) or len(quote[name]) != size:
            raise FormatError(f"simulated quote {name} must be {size} bytes")
    for name in ("isv_prod_id", "isv_svn"):
        value = quote[name]
        if type(value) is not int or not 0 <= value <= 0xFFFF:
            raise FormatError(f"simulated quote {name} must be an integer in 0..65535")
    if type(quote["debug"]) is not bool:
        raise FormatError("simulated quote debug must be a boolean")
    return Claims(
        tee=TeeType.SIMULATED,
        report_data=quote["report_data"],
        tcb_status=SIMULATED_TCB_STATUS,
        mr_enclave=quote["mr_enclave"],
        mr_signer=quote["mr_signer"],
        isv_prod_id=quote["isv_prod_id"],
        isv_svn=quote["isv_svn"],
        debug=quote["debug"],
    )


def decode_cbor(data: bytes, *, what: str) -> Any:
    """Decode exactly one definite-length CBOR item made of plain values (maps, arrays,
    byte and text strings, integers, booleans, null) and, at the top level only, one tag.

    Anything else (trailing bytes, duplicate or non-string keys, tags that do not decode to
    plain values, nesting deeper than 16, cycles) is a FormatError.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise FormatError(f"{what}: expected bytes, got {type(data).__name__}")
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            read_size=1,
            max_depth=_MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        item = decoder.decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise FormatError(f"{what}: malformed CBOR: {exc}") from exc
    if stream.tell() != len(data):
        raise FormatError(f"{what}: {len(data) - stream.tell()} trailing bytes after the CBOR item")
    if isinstance(item, cbor2.CBORTag):
        return cbor2.CBORTag(item.tag, _plain(item.value, what, 1))
    return _plain(item, what, 0)


def _plain(item: Any, what: str, depth: int) -> Any:
    """`item` as plain lists and dicts (cbor2 gives tuples and frozendicts inside tags)."""
    if depth > _MAX_DEPTH:
        raise FormatError(f"{what}: CBOR nested deeper than {_MAX_DEPTH}")
    if isinstance(item, (dict, cbor2.frozendict)):
        return {
            _plain(key, what, depth + 1): _plain(value, what, depth + 1)
            for key, value in item.items()
        }
    if isinstance(item, (list, tuple)):
        return [_plain(value, what, depth + 1) for value in item]
    if item is not None and type(item) not in (bytes, str, int, bool):
        raise FormatError(f"{what}: unexpected CBOR value of type {type(item).__name__}")
    return item
