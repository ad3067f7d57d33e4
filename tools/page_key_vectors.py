#!/usr/bin/env python3
# Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
"""Known-answer vectors for kvcache's prefix-cache page keys (docs/PAGE_KEYS.md).

An independent implementation of the key encoding, written from docs/PAGE_KEYS.md and not from
the C++ code, so that the two check each other. Prints the vectors as Markdown (default) or as
the C++ table of src/paged/page_key_test.cpp (--cpp).

Needs the PyPI package `xxhash` (>= 2.0, for XXH3-128): pip install xxhash
"""

import argparse
import hashlib
import struct
import sys

import xxhash

# Field type tags (one byte each).
TAG_DOMAIN = 0x01
TAG_MODEL_ID = 0x02
TAG_KV_DTYPE = 0x03
TAG_PAGE_SIZE = 0x04
TAG_LAYER_GROUP = 0x05
TAG_SALT = 0x06
TAG_PARENT = 0x10
TAG_TOKENS = 0x11
TAG_ADAPTER = 0x12
TAG_MULTIMODAL = 0x13

ROOT_DOMAIN = b"kvcache/root/v1"
PAGE_DOMAIN = b"kvcache/page/v1"


def uleb128(n):
    """Unsigned LEB128 (as protobuf's varint): 7 bits a byte, low first, high bit = more."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(tag, payload):
    """1-byte tag, payload length in bytes as unsigned LEB128, payload."""
    return bytes([tag]) + uleb128(len(payload)) + payload


def i64(v):
    return struct.pack("<q", v)


def encode_root(model_id, kv_dtype, page_size, layer_group, salt):
    return (field(TAG_DOMAIN, ROOT_DOMAIN) + field(TAG_MODEL_ID, model_id.encode("utf-8")) +
            field(TAG_KV_DTYPE, kv_dtype.encode("utf-8")) + field(TAG_PAGE_SIZE, i64(page_size)) +
            field(TAG_LAYER_GROUP, i64(layer_group)) + field(TAG_SALT, salt.encode("utf-8")))


def encode_page(parent, tokens, first_pos, adapter, multimodal):
    """multimodal: list of (content_hash str, begin, end), in the caller's order."""
    assert len(parent) == 32
    msg = (field(TAG_DOMAIN, PAGE_DOMAIN) + field(TAG_PARENT, parent) +
           field(TAG_TOKENS, b"".join(struct.pack("<i", t) for t in tokens)) +
           field(TAG_ADAPTER, adapter.encode("utf-8")))
    page_end = first_pos + len(tokens)
    for content_hash, begin, end in multimodal:
        lo, hi = max(begin, first_pos), min(end, page_end)
        if lo < hi:
            msg += field(TAG_MULTIMODAL,
                         i64(lo - first_pos) + i64(hi - first_pos) + content_hash.encode("utf-8"))
    return msg


def sha256(msg):
    return hashlib.sha256(msg).digest()


def xxh3_128(msg):
    # The canonical (big-endian) form of the 128-bit hash, then 16 zero bytes.
    return xxhash.xxh3_128_digest(msg) + bytes(16)


HASHES = [("sha256", sha256), ("xxh3_128", xxh3_128)]


def page_keys(hash_fn, case):
    root = hash_fn(
        encode_root(case["model_id"], case["kv_dtype"], case["page_size"], case["layer_group"],
                    case["salt"]))
    keys = []
    parent = root
    n = case["page_size"]
    for p in range(len(case["tokens"]) // n):
        parent = hash_fn(
            encode_page(parent, case["tokens"][p * n:(p + 1) * n], p * n, case["adapter"],
                        case["multimodal"]))
        keys.append(parent)
    return root, keys


# Token ids that look like a real tokenizer's: several above 65535 and one with every byte
# nonzero and a negative one, so a wrong byte order, width or sign shows.
TOKENS_48 = [
    128000, 791, 6864, 315, 9822, 374, 12366, 13, 578, 6864, 315, 9635, 374, 20437, 13, 578,
    2147483647, -1, 0, 65536, 100, 16909060, 4242, 77, 13, 128001, 88, 99, 3000, 3001, 3002, 3003,
    45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60
]

BASE = dict(model_id="meta-llama/Llama-3.1-8B@main", kv_dtype="bf16", page_size=16,
            layer_group=0, salt="", adapter="", multimodal=[], tokens=TOKENS_48[:16])

IMAGE = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
AUDIO = "audio/clip-7"

CASES = [
    ("one_page", "one 16-token page, empty salt and adapter", {}),
    ("salt", "as one_page with salt \"tenant-42\"", dict(salt="tenant-42")),
    ("adapter", "as one_page with adapter \"lora/sql-v2\"", dict(adapter="lora/sql-v2")),
    ("one_span", "two pages, one image span [10, 20) overlapping both partially",
     dict(tokens=TOKENS_48[:32], multimodal=[(IMAGE, 10, 20)])),
    ("two_spans", "two pages; spans [10, 20) and [24, 40) (the second runs past the tokens)",
     dict(tokens=TOKENS_48[:32], multimodal=[(IMAGE, 10, 20), (AUDIO, 24, 40)])),
    ("one_token_pages", "page_size 1, layer group 3, split K/V dtypes, non-ASCII model id",
     dict(model_id="modèle/ü-7B", kv_dtype="k:int8,v:bf16", page_size=1, layer_group=3,
          tokens=[5, 6, 7])),
    ("chain_of_3", "50 tokens, page_size 16: three full pages, two tokens left over",
     dict(tokens=TOKENS_48 + [61, 62], salt="s", adapter="a")),
    ("long_fields", "page_size 40 and a 200-byte salt: lengths of two LEB128 bytes",
     dict(page_size=40, salt="s" * 200, tokens=TOKENS_48[:40])),
    ("everything", "page_size 4, salt, adapter, one span on page 1 only",
     dict(page_size=4, layer_group=1, salt="tenant-42", adapter="lora/sql-v2",
          tokens=TOKENS_48[:10], multimodal=[(IMAGE, 5, 7)])),
]


def full_case(overrides):
    case = dict(BASE)
    case.update(overrides)
    return case


def md_str(s):
    return '"' + s + '"'


def print_markdown():
    print("<!-- Generated by tools/page_key_vectors.py; do not edit by hand. -->")
    print()
    print("TOKENS_48 (the token ids the cases slice; `tokens[:16]` = the first 16):")
    print()
    print("```")
    for i in range(0, len(TOKENS_48), 16):
        print(", ".join(str(t) for t in TOKENS_48[i:i + 16]) + ("," if i + 16 < 48 else ""))
    print("```")
    print()
    print("IMAGE = `" + md_str(IMAGE) + "`, AUDIO = `" + md_str(AUDIO) + "`")
    print()
    one = full_case({})
    root_msg = encode_root(one["model_id"], one["kv_dtype"], one["page_size"], one["layer_group"],
                           one["salt"])
    print("Encoded messages of case `one_page` (hex), to check an encoder before hashing:")
    print()
    print("root message (%d bytes):" % len(root_msg))
    print()
    print("```")
    print(root_msg.hex())
    print("```")
    page_msg = encode_page(sha256(root_msg), one["tokens"], 0, "", [])
    print()
    print("page 0 message, SHA-256 chain (%d bytes):" % len(page_msg))
    print()
    print("```")
    print(page_msg.hex())
    print("```")
    two = full_case(CASES[4][2])
    page1_msg = encode_page(bytes(range(32)), two["tokens"][16:32], 16, "", two["multimodal"])
    print()
    print("A page message with multimodal fields: case `two_spans`' page 1 (tokens[16:32],")
    print("first_pos 16) with parent bytes 00 01 02 .. 1f (%d bytes):" % len(page1_msg))
    print()
    print("```")
    print(page1_msg.hex())
    print("```")
    for name, desc, overrides in CASES:
        case = full_case(overrides)
        print()
        print("### `%s`: %s" % (name, desc))
        print()
        print("- model_id `%s`, kv_dtype `%s`, page_size %d, layer_group %d" %
              (md_str(case["model_id"]), md_str(case["kv_dtype"]), case["page_size"],
               case["layer_group"]))
        salt = case["salt"]
        salt_md = ('"s" * %d' % len(salt)) if len(salt) > 20 and set(salt) == {"s"} else md_str(salt)
        print("- salt `%s`, adapter `%s`" % (salt_md, md_str(case["adapter"])))
        toks = case["tokens"]
        if toks == TOKENS_48[:len(toks)]:
            print("- tokens: TOKENS_48[:%d]" % len(toks))
        elif toks[:48] == TOKENS_48:
            print("- tokens: TOKENS_48 + %s" % toks[48:])
        else:
            print("- tokens: %s" % toks)
        if case["multimodal"]:
            spans = ", ".join("(%s, %d, %d)" % ("IMAGE" if h == IMAGE else "AUDIO", b, e)
                              for h, b, e in case["multimodal"])
            print("- multimodal (content_hash, begin, end): %s" % spans)
        print()
        print("| hash | key | hex |")
        print("| --- | --- | --- |")
        for hname, fn in HASHES:
            root, keys = page_keys(fn, case)
            print("| %s | root | `%s` |" % (hname, root.hex()))
            for i, k in enumerate(keys):
                print("| %s | page %d | `%s` |" % (hname, i, k.hex()))


def print_cpp():
    print("// Generated by tools/page_key_vectors.py --cpp.")
    one = full_case({})
    root_msg = encode_root(one["model_id"], one["kv_dtype"], one["page_size"], one["layer_group"],
                           one["salt"])
    page_msg = encode_page(sha256(root_msg), one["tokens"], 0, "", [])
    two = full_case(CASES[4][2])
    page1_msg = encode_page(bytes(range(32)), two["tokens"][16:32], 16, "", two["multimodal"])
    print('constexpr const char* kOnePageRootMessage = "%s";' % root_msg.hex())
    print('constexpr const char* kOnePagePageMessage = "%s";' % page_msg.hex())
    print('constexpr const char* kTwoSpansPage1Message = "%s";' % page1_msg.hex())
    print("std::vector<Vector> known_vectors() {")
    print("  return {")
    for name, _, overrides in CASES:
        case = full_case(overrides)
        for hname, fn in HASHES:
            root, keys = page_keys(fn, case)
            print('    {"%s", HashKind::%s, "%s", {' % (name, hname, root.hex()))
            for k in keys:
                print('      "%s",' % k.hex())
            print("    }},")
    print("  };")
    print("}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpp", action="store_true", help="print the C++ test table")
    args = parser.parse_args()
    if args.cpp:
        print_cpp()
    else:
        print_markdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
