"""A seeded generator of malformed requests: uploads, S3 notifications, registrations and queries.

Each case is a :class:`Case` (method, path, and how to send the body); :func:`generate` yields at least
``count`` of them, drawn from every category the hostile-input issue lists plus the classic ones (empty,
random bytes, truncations, bit flips, bombs, polyglots, odd formats and modes, odd file names and
content types). The same seed gives the same cases, so a failure names a case that can be replayed.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Case:
    category: str
    method: str
    path: str
    params: dict | None = None
    json_text: str | None = None  # sent verbatim as application/json (may be invalid JSON)
    content: bytes | None = None  # sent verbatim
    files: dict | None = None
    data: dict | None = None
    headers: dict = field(default_factory=dict)
    auth: str = "ingest"  # ingest, review, admin, events, none, wrong


# --- images ----------------------------------------------------------------------------------------


def textured(rng: random.Random, size=(96, 96), mode="RGB") -> Image.Image:
    small = Image.frombytes("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)), rng.randbytes(max(1, size[0] // 8) * max(1, size[1] // 8) * 3))
    image = small.resize(size, Image.Resampling.BILINEAR)
    return image.convert(mode) if mode != "RGB" else image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def valid_image(rng: random.Random) -> bytes:
    fmt = rng.choice(["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
    size = (rng.randrange(32, 300), rng.randrange(32, 300))
    return encode(textured(rng, size), fmt)


def _scan_start(data: bytes) -> int:
    position = 2
    while position + 4 <= len(data):
        marker, length = data[position + 1], int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            return position + 2 + length
        position += 2 + length
    return len(data) // 2


def _claim_size(data: bytes, width: int, height: int) -> bytes:
    patched = bytearray(data)
    position = 2
    while position + 9 <= len(patched):
        marker, length = patched[position + 1], int.from_bytes(patched[position + 2 : position + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            patched[position + 5 : position + 9] = struct.pack(">HH", height, width)
            break
        position += 2 + length
    return bytes(patched)


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    data = bytearray(encode(Image.new("L", (16, 16)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    import zlib

    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


_WORST_CASE_PNGS: dict[int, bytes] = {}


def worst_case_png(max_pixels: int) -> bytes:
    """The largest allowed image, as a small file: a square RGBA PNG just under the pixel limit."""
    if max_pixels not in _WORST_CASE_PNGS:
        side = int(max_pixels**0.5) - 1
        image = Image.new("RGBA", (side, side), (30, 60, 90, 200))
        _WORST_CASE_PNGS[max_pixels] = encode(image, "PNG", compress_level=1)
    return _WORST_CASE_PNGS[max_pixels]


def bad_image(rng: random.Random) -> tuple[str, bytes]:
    """(kind, bytes) of one hostile file."""
    base_jpeg = encode(textured(rng, (rng.randrange(64, 256), rng.randrange(64, 256))), "JPEG", quality=rng.randrange(30, 95))
    kind = rng.choice([
        "empty", "random", "truncated", "bitflip", "cut_with_eoi", "header_liar", "png_bomb", "gif_bomb",
        "polyglot_zip", "polyglot_html", "odd_mode", "odd_format", "tiny", "text", "animated", "cmyk",
    ])
    if kind == "empty":
        return kind, b""
    if kind == "random":
        return kind, rng.randbytes(rng.randrange(1, 4096))
    if kind == "truncated":
        source = rng.choice([base_jpeg, encode(textured(rng, (120, 90)), rng.choice(["PNG", "WEBP", "GIF", "TIFF", "BMP"]))])
        return kind, source[: rng.randrange(1, len(source) - 1)]
    if kind == "bitflip":
        flipped = bytearray(rng.choice([base_jpeg, encode(textured(rng, (100, 80)), "PNG")]))
        for _ in range(rng.randrange(1, 20)):
            position = rng.randrange(len(flipped))
            flipped[position] ^= 1 << rng.randrange(8)
        return kind, bytes(flipped)
    if kind == "cut_with_eoi":
        start = _scan_start(base_jpeg)
        return kind, base_jpeg[: rng.randrange(start + 1, max(start + 2, len(base_jpeg) - 16))] + b"\xff\xd9"
    if kind == "header_liar":
        return kind, _claim_size(base_jpeg, rng.choice([7071, 4000, 1024]), rng.choice([7071, 3000, 1024]))
    if kind == "png_bomb":
        return kind, _png_with_size(rng.choice([100_000, 65_535, 20_000]), rng.choice([100_000, 30_000]))
    if kind == "gif_bomb":
        data = bytearray(encode(Image.new("P", (16, 16)), "GIF"))
        data[6:10] = struct.pack("<HH", 65_535, 65_535)
        return kind, bytes(data)
    if kind == "polyglot_zip":
        return kind, base_jpeg + b"PK\x03\x04" + rng.randbytes(200) + b"PK\x05\x06" + bytes(18)
    if kind == "polyglot_html":
        return kind, b"GIF89a/*<html><script>alert(1)</script>*/" + rng.randbytes(64)
    if kind == "odd_mode":
        mode, fmt = rng.choice([("1", "PNG"), ("I;16", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("RGBA", "WEBP"), ("L", "JPEG")])
        image = textured(rng, (rng.randrange(20, 120), rng.randrange(20, 120)))
        converted = image.convert("L").convert(mode) if mode in ("I;16", "I", "F") else image.convert(mode)
        return kind, encode(converted, fmt)
    if kind == "odd_format":
        fmt = rng.choice(["ICO", "PPM", "TGA", "PCX", "EPS-ish", "PDF-ish", "SVG"])
        if fmt == "EPS-ish":
            return kind, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
        if fmt == "PDF-ish":
            return kind, b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"
        if fmt == "SVG":
            return kind, b'<svg xmlns="http://www.w3.org/2000/svg" width="99999" height="99999"/>'
        return kind, encode(textured(rng, (32, 32)), fmt)
    if kind == "tiny":
        return kind, encode(textured(rng, (rng.randrange(1, 15), rng.randrange(1, 15))), rng.choice(["PNG", "JPEG"]))
    if kind == "text":
        return kind, "ceci n'est pas une image \u2603\n".encode() * rng.randrange(1, 50)
    if kind == "animated":
        frames = [textured(rng, (48, 48)) for _ in range(3)]
        buffer = io.BytesIO()
        frames[0].save(buffer, format=rng.choice(["GIF", "WEBP"]), save_all=True, append_images=frames[1:])
        return kind, buffer.getvalue()
    # CMYK JPEG
    return kind, encode(textured(rng, (80, 80)).convert("CMYK"), "JPEG")


ODD_FILENAMES = [
    "a.jpg", "", "../../etc/passwd", "x" * 5000 + ".jpg", "\u202egnp.exe", "emoji-\U0001f600.png", "con.jpg",
    "name with spaces.jpeg", "semi;colon.jpg", 'quote".jpg', "new\nline.jpg", "%00.jpg", "a" * 255 + ".png",
]
ODD_CONTENT_TYPES = [
    "image/jpeg", "image/png", "application/octet-stream", "text/html", "", "image/svg+xml",
    "multipart/form-data", "image/jpeg; charset=\u00ff", "x" * 300, "application/pdf",
]


def _surrogate(rng: random.Random) -> str:
    return rng.choice(["\\ud800", "\\udfff", "\\ud83d", "\\udc00x"])


def _record(rng: random.Random, bucket: str, key_text: str, size_text: str = "123", event: str = '"ObjectCreated:Put"') -> str:
    return (
        '{"eventName":' + event + ',"s3":{"bucket":{"name":' + bucket + '},"object":{"key":' + key_text
        + ',"size":' + size_text + ',"eTag":"abc"}}}'
    )


def _json_str(value: str) -> str:
    return json.dumps(value)


# --- the generator -----------------------------------------------------------------------------------


def generate(rng: random.Random, count: int, upload_bucket: str, extra_bucket: str) -> Iterator[Case]:
    """At least ``count`` cases, cycling through the makers below with random choices inside each."""
    makers: list[Callable[[random.Random], Case]] = [
        lambda r: _upload_case(r),
        lambda r: _upload_case(r),
        lambda r: _upload_case(r),
        lambda r: _raw_upload_case(r),
        lambda r: _event_case(r, upload_bucket, extra_bucket),
        lambda r: _event_case(r, upload_bucket, extra_bucket),
        lambda r: _register_case(r, upload_bucket, extra_bucket),
        lambda r: _register_case(r, upload_bucket, extra_bucket),
        lambda r: _query_case(r),
        lambda r: _query_case(r),
        lambda r: _review_case(r),
    ]
    for index in range(count):
        yield makers[index % len(makers)](rng)


def _upload_case(rng: random.Random) -> Case:
    kind, data = bad_image(rng) if rng.random() < 0.85 else ("valid", valid_image(rng))
    filename = rng.choice(ODD_FILENAMES)
    content_type = rng.choice(ODD_CONTENT_TYPES)
    data_fields = {}
    roll = rng.random()
    if roll < 0.1:
        data_fields["source"] = "s" * rng.choice([255, 256, 10_000])
    elif roll < 0.2:
        data_fields["source"] = rng.choice(["with\x00nul", "", "\u0000", "ok-source", "\u200b", "é" * 200])
    return Case(
        f"upload:{kind}", "POST", "/v1/images", files={"file": (filename, data, content_type)}, data=data_fields,
        auth=rng.choice(["ingest"] * 8 + ["none", "wrong", "review"]),
    )


def _raw_upload_case(rng: random.Random) -> Case:
    """Bodies no well-behaved client sends: broken multipart, lying lengths, JSON to a form endpoint."""
    kind = rng.choice(["no_boundary", "bad_boundary", "json", "garbage", "huge_declared", "surrogate_source", "two_files"])
    headers = {}
    if kind == "no_boundary":
        headers["content-type"] = "multipart/form-data"
        content = b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--x--\r\n"
    elif kind == "bad_boundary":
        headers["content-type"] = "multipart/form-data; boundary=" + "b" * rng.choice([1, 70, 200])
        content = rng.randbytes(rng.randrange(0, 2000))
    elif kind == "json":
        headers["content-type"] = "application/json"
        content = b'{"file": "not a file"}'
    elif kind == "garbage":
        headers["content-type"] = rng.choice(["image/jpeg", "text/plain", "application/x-www-form-urlencoded"])
        content = rng.randbytes(rng.randrange(0, 3000))
    elif kind == "huge_declared":
        # Declares 4 GB: must be refused from the header alone (the client sends nothing more).
        headers["content-type"] = "multipart/form-data; boundary=x"
        headers["content-length"] = str(4 * 1024**3)
        content = b""
    elif kind == "surrogate_source":
        headers["content-type"] = "multipart/form-data; boundary=x"
        content = (
            b"--x\r\nContent-Disposition: form-data; name=\"source\"\r\n\r\n\xed\xa0\x80\xff\xfe\r\n"
            b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
            + encode(textured(rng, (40, 40)), "PNG") + b"\r\n--x--\r\n"
        )
    else:
        headers["content-type"] = "multipart/form-data; boundary=x"
        part = b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n" + b"\x89PNG" + b"\r\n"
        content = part * 2 + b"--x--\r\n"
    return Case(f"upload-raw:{kind}", "POST", "/v1/images", content=content, headers=headers)


def _event_case(rng: random.Random, upload_bucket: str, extra_bucket: str) -> Case:
    bucket = _json_str(rng.choice([extra_bucket, upload_bucket]))
    kind = rng.choice([
        "deep", "size", "surrogate_key", "surrogate_bucket", "surrogate_event", "long_segment", "too_many",
        "not_json", "empty", "wrong_shapes", "bucket_not_allowed", "nul_key", "ignored", "big_body", "long_key",
        "encoded_key", "test_event", "non_object",
    ])
    key = _json_str(f"hostile/{rng.getrandbits(40):x}.jpg")
    if kind == "deep":
        depth = rng.choice([300, 5000, 20_000])
        text = '{"Records":' + "[" * depth + "]" * depth + "}" if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
    elif kind == "size":
        size = rng.choice(["Infinity", "-Infinity", "NaN", "1e308", str(2**63), str(2**64 + 1), "-1", '"12"', "1.5", "1e3", "null", "[]"])
        text = '{"Records":[' + _record(rng, bucket, key, size) + "]}"
    elif kind == "surrogate_key":
        text = '{"Records":[' + _record(rng, bucket, '"a/' + _surrogate(rng) + '.jpg"') + "]}"
    elif kind == "surrogate_bucket":
        text = '{"Records":[' + _record(rng, '"b' + _surrogate(rng) + '"', key) + "]}"
    elif kind == "surrogate_event":
        text = '{"Records":[' + _record(rng, bucket, key, event='"ObjectCreated:' + _surrogate(rng) + '"') + "]}"
    elif kind == "long_segment":
        text = '{"Records":[' + _record(rng, bucket, _json_str("a/" + "x" * rng.choice([256, 300, 1000]) + ".jpg")) + "]}"
    elif kind == "too_many":
        records = ",".join(_record(rng, bucket, _json_str(f"many/{i}.jpg")) for i in range(rng.choice([1001, 5000])))
        text = '{"Records":[' + records + "]}"
    elif kind == "not_json":
        text = rng.choice(["", "{", "nul", "\x00\x01", '{"Records": [}', "[1,2,3]", '"just a string"', "1e999"])
    elif kind == "empty":
        text = rng.choice(['{"Records":[]}', "{}", '{"Records":null}', '{"Records":{}}'])
    elif kind == "wrong_shapes":
        text = '{"Records":[' + rng.choice([
            '{"s3":{"bucket":"x","object":{"key":"a"}}}', '{"s3":null}', '{"s3":{"bucket":{"name":1},"object":{"key":2}}}',
            '{"eventName":7,"s3":{"bucket":{"name":"b"},"object":{"key":"k"}}}', "1", '"x"', "[]",
        ]) + "]}"
    elif kind == "bucket_not_allowed":
        text = '{"Records":[' + _record(rng, _json_str("someone-elses-bucket"), key) + "]}"
    elif kind == "nul_key":
        text = '{"Records":[' + _record(rng, bucket, '"a\\u0000b.jpg"') + "]}"
    elif kind == "ignored":
        text = '{"Records":[' + _record(rng, bucket, key, event='"ObjectRemoved:Delete"') + "]}"
    elif kind == "big_body":
        text = '{"Records":[' + _record(rng, bucket, key) + '],"pad":"' + "x" * (3 * 1024 * 1024) + '"}'
    elif kind == "long_key":
        text = '{"Records":[' + _record(rng, bucket, _json_str("k/" * 600)) + "]}"
    elif kind == "encoded_key":
        text = '{"Records":[' + _record(rng, bucket, _json_str(rng.choice(["a%00b.jpg", "%ED%A0%80.jpg", "%ff%fe.jpg", "..%2F..%2Fetc", "a+b%2Bc.jpg", "%"]))) + "]}"
    elif kind == "test_event":
        text = '{"Event":"s3:TestEvent"}'
    else:
        text = rng.choice(['{"Records":[null, 1, "x", {}]}', '[{"Records":[]}]'])
    auth = rng.choice(["events"] * 9 + ["none", "wrong"])
    return Case(f"event:{kind}", "POST", "/v1/events/s3", json_text=text, auth=auth)


def _register_case(rng: random.Random, upload_bucket: str, extra_bucket: str) -> Case:
    kind = rng.choice([
        "long_segment", "nul_source", "surrogate", "too_long", "wrong_types", "missing_object", "deep",
        "bucket_not_allowed", "absolute", "dotdot", "long_source", "extra_fields", "not_json", "existing",
    ])
    bucket = rng.choice([extra_bucket, upload_bucket])
    if kind == "long_segment":
        text = json.dumps({"bucket": bucket, "key": "a/" + "y" * rng.choice([256, 400]) + ".jpg"})
    elif kind == "nul_source":
        text = json.dumps({"bucket": bucket, "key": "reg/a.jpg", "source": "x\x00y"})
    elif kind == "surrogate":
        field_name = rng.choice(["bucket", "key", "source"])
        values = {"bucket": json.dumps(bucket), "key": '"reg/b.jpg"', "source": '"s"'}
        values[field_name] = '"z' + _surrogate(rng) + '"'
        text = "{" + ",".join(f'"{k}":{v}' for k, v in values.items()) + "}"
    elif kind == "too_long":
        text = json.dumps({"bucket": "b" * 256, "key": "k" * 1025})
    elif kind == "wrong_types":
        text = json.dumps(rng.choice([{"bucket": 1, "key": []}, {"bucket": None}, [1, 2], "s", {"bucket": {"a": 1}, "key": True}]))
    elif kind == "missing_object":
        text = json.dumps({"bucket": bucket, "key": f"missing/{rng.getrandbits(32):x}.jpg"})
    elif kind == "deep":
        depth = rng.choice([500, 5000])
        text = '{"bucket":' + "[" * depth + "]" * depth + "}"
    elif kind == "bucket_not_allowed":
        text = json.dumps({"bucket": "not-ours", "key": "a.jpg"})
    elif kind == "absolute":
        text = json.dumps({"bucket": bucket, "key": "/etc/passwd"})
    elif kind == "dotdot":
        text = json.dumps({"bucket": bucket, "key": rng.choice(["../a.jpg", "a/../../b", "a/./b", "a//b", "a\\b", "a/"])})
    elif kind == "long_source":
        text = json.dumps({"bucket": bucket, "key": "reg/c.jpg", "source": "s" * 256})
    elif kind == "extra_fields":
        text = json.dumps({"bucket": bucket, "key": "reg/d.jpg", "priority": 10**400 if False else "9" * 400})
    elif kind == "not_json":
        text = rng.choice(["", "{", "\xff", "null"])
    else:
        text = json.dumps({"bucket": extra_bucket, "key": "poison/existing.jpg"})
    return Case(f"register:{kind}", "POST", "/v1/images:register", json_text=text, auth=rng.choice(["ingest"] * 9 + ["review", "none"]))


_EDGE_TIMES = [
    "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00", "9999-12-31T23:59:59",
    "0000-00-00", "2026-02-30T00:00:00Z", "2026-13-01", "not-a-date", "1e400", "2026-01-01T00:00:00+25:00",
    "2026-01-01T24:00:00", "-0001-01-01", "+275760-09-13T00:00:00Z", "2026-01-01T00:00:00.9999999999Z",
]


def _cursor(value, order: str = "score_desc", item_id="x") -> str:
    raw = '{"o":' + json.dumps(order) + ',"v":' + value + ',"id":' + item_id + "}"
    return base64.urlsafe_b64encode(raw.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def _query_case(rng: random.Random) -> Case:
    kind = rng.choice(["times", "cursor", "numbers", "enums", "strings", "item_ids", "stats", "image", "heatmap"])
    if kind == "times":
        params = {rng.choice(["since", "until"]): rng.choice(_EDGE_TIMES)}
        return Case("query:times", "GET", "/v1/items", params=params, auth="review")
    if kind == "cursor":
        order = rng.choice(["newest", "oldest", "score_desc", "score_asc"])
        cursor = rng.choice([
            _cursor("9" * 400, order), _cursor("-" + "9" * 400, order), _cursor("1e400", order), _cursor("NaN", order),
            _cursor('"9999-12-31T23:59:59-12:00"', order), _cursor('"0001-01-01T00:00:00+14:00"', order),
            _cursor("0.5", order, '"' + "i" * 5000 + '"'), _cursor("0.5", order, "[1]"), _cursor("{}", order),
            _cursor('"\\ud800"', order), _cursor("0.5", '"\\ud800"'), "!!!!", "a" * 999, "", "=" * 10,
            base64.urlsafe_b64encode(b"[" * 3000).decode(), base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        ])
        return Case("query:cursor", "GET", "/v1/items", params={"order": order, "cursor": cursor}, auth="review")
    if kind == "numbers":
        name = rng.choice(["limit", "min_score", "max_score"])
        value = rng.choice(["NaN", "inf", "-inf", "1e308", "9" * 400, "-1", "0", "1.0000001", "0x10", "", "501"])
        return Case("query:numbers", "GET", "/v1/items", params={name: value}, auth="review")
    if kind == "enums":
        name = rng.choice(["status", "label", "order", "decision", "reviewed", "in_review"])
        return Case("query:enums", "GET", "/v1/items", params={name: rng.choice(["", "x" * 300, "\x00", "CLASSIFIED", "2"])}, auth="review")
    if kind == "strings":
        name = rng.choice(["source", "model_version"])
        if rng.random() < 0.3:
            # Percent-encoded bytes that are no UTF-8 (a lone surrogate, a stray 0xFF): sent raw.
            return Case("query:strings", "GET", f"/v1/items?{name}=" + rng.choice(["%ED%A0%80", "%FF%FE", "%00", "%C0%80"]), auth="review")
        value = rng.choice(["x" * 256, "x" * 10_000, "a\x00b", "\u202e"])
        return Case("query:strings", "GET", "/v1/items", params={name: value}, auth="review")
    if kind == "item_ids":
        item_id = rng.choice(["x" * 37, "x" * 5000, "%00", "..%2F..", "%ED%A0%80", "%ff", "0", "' OR 1=1 --"])
        return Case("query:item_id", "GET", rng.choice(["/v1/images/", "/v1/items/"]) + item_id, auth=rng.choice(["review", "ingest"]))
    if kind == "stats":
        return Case("query:stats", "GET", "/v1/stats", params={rng.choice(["since", "until"]): rng.choice(_EDGE_TIMES)}, auth="review")
    if kind == "image":
        return Case(
            "query:image", "GET", "/v1/items/" + rng.choice(["nope", "x" * 40]) + "/image",
            params={"variant": rng.choice(["thumb", "full", "huge", ""]), "sig": rng.choice(["", "x" * 3000]), "exp": rng.choice(["9" * 400, "-1", "x"])},
            auth=rng.choice(["review", "none"]),
        )
    return Case(
        "query:heatmap", "GET", "/v1/items/nope/heatmap", params={"model_version": rng.choice(["\x00", "x" * 129, "../../x"])},
        auth="review",
    )


def _review_case(rng: random.Random) -> Case:
    kind = rng.choice(["review", "retract", "claim", "release", "keys"])
    if kind == "review":
        body = rng.choice([
            '{"decision":"confirmed_fake","note":"' + "n" * 4001 + '"}', '{"decision":"maybe"}',
            '{"decision":"escalated","note":"a\\u0000b"}', '{"decision":"escalated","note":"\\ud800"}', "[]", "{",
        ])
        return Case("review:decide", "POST", "/v1/items/nope/reviews", json_text=body, auth="review",
                    headers={"idempotency-key": rng.choice(["k" * 65, "ok", ""])})
    if kind == "retract":
        review_id = rng.choice(["9" * 400, "-1", "0", "x", str(2**31), str(2**63)])
        return Case("review:retract", "POST", f"/v1/items/nope/reviews/{review_id}/retract", json_text="{}", auth="review")
    if kind == "claim":
        return Case("review:claim", "POST", "/v1/queue/claim", json_text=rng.choice(['{"limit":' + "9" * 400 + "}", '{"limit":-1}', '{"limit":1e308}', '{"limit":"NaN"}']), auth="review")
    if kind == "release":
        return Case("review:release", "POST", "/v1/queue/release", json_text=json.dumps({"ids": ["x" * 37] * rng.choice([1, 501])}), auth="review")
    return Case("admin:keys", "POST", "/v1/keys", json_text=rng.choice([
        json.dumps({"name": "n" * 256, "scopes": ["ingest"]}), '{"name":"a\\u0000","scopes":["ingest"]}',
        '{"name":"\\udfff","scopes":["ingest"]}', json.dumps({"name": "x", "scopes": ["root"]}),
    ]), auth="admin")
