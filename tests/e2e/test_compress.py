"""compress, end to end: responses of a real backend through a real gateway, encoded
by Accept-Encoding and decoded by the reference libraries (zlib, Google's brotli,
python-zstandard) and by curl --compressed."""

import gzip
import hashlib
import json

import brotli
import pytest
import zstandard

from harness import Addr, Gateway, api, curl, filters, service, validate_bad

BIG = "x" * 3000  # the echoed JSON is above the default minLength (1024)

DECODE = {
    "gzip": gzip.decompress,
    "br": brotli.decompress,
    "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b),
}


@pytest.fixture
def gw(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend)
                + api("api", "/api/{*rest}", "{service: up}", extra=filters("{name: compress}"))
                + api("cached", "/cached/{*rest}", "{service: up}",
                      extra=filters("{name: compress}", "{name: cache, config: {ttl: 60s}}"))
                + api("plain", "/plain/{*rest}", "{service: up}"))
    gateways.append(g)
    return g


def post(gw, path, *args):
    return curl(gw.url + path, "-X", "POST", "--data-binary", BIG, *args)


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_each_coding_round_trips_through_its_reference_decoder(gw, coding):
    status, headers, body, _ = post(gw, "/api/x", "-H", f"accept-encoding: {coding}")
    assert status == 200
    assert headers["content-encoding"] == coding
    assert "content-length" not in headers
    assert headers["vary"].lower() == "accept-encoding"
    echoed = json.loads(DECODE[coding](body))
    assert echoed["body"] == BIG
    assert len(body) < 1000, len(body)  # 3 KB of one letter compresses well


def test_curl_decodes_what_it_negotiated(gw):
    status, headers, body, _ = post(gw, "/api/x", "--compressed")
    assert status == 200 and headers["content-encoding"] in ("zstd", "br", "gzip")
    assert json.loads(body)["body"] == BIG


@pytest.mark.parametrize("accept, chosen", [
    ("gzip, br, zstd", "zstd"),          # server order breaks ties
    ("br;q=0.5, gzip", "gzip"),          # q-values first
    ("*;q=0.3, gzip;q=0.2", "zstd"),     # * covers what is not named
    ("zstd;q=0, br;q=0, gzip;q=0", None),
    ("identity", None),
    ("deflate", None),
])
def test_accept_encoding_is_negotiated(gw, accept, chosen):
    _, headers, body, _ = post(gw, "/api/x", "-H", f"accept-encoding: {accept}")
    assert headers.get("content-encoding") == chosen, headers
    if chosen is None:
        assert json.loads(body)["body"] == BIG
        assert headers["vary"].lower() == "accept-encoding"


def test_responses_that_must_not_be_compressed_are_left_alone(gw):
    ae = ("-H", "accept-encoding: gzip")
    # Too small (the echo of a GET is a few hundred bytes): identity, but Vary says
    # the representation could depend on Accept-Encoding.
    _, headers, body, _ = curl(gw.url + "/api/small", *ae)
    assert "content-encoding" not in headers and headers["vary"].lower() == "accept-encoding"
    assert int(headers["content-length"]) == len(body)
    # Already compressed types, and types not listed.
    for ctype in ("image/png", "application/zip", "text/event-stream"):
        _, headers, body, _ = post(gw, f"/api/t?h-content-type={ctype}", *ae)
        assert "content-encoding" not in headers and "vary" not in headers, (ctype, headers)
        assert json.loads(body)["body"] == BIG
    # Already encoded by the upstream.
    _, headers, body, _ = post(gw, "/api/e?h-content-encoding=identity2", *ae)
    assert headers["content-encoding"] == "identity2" and json.loads(body)["body"] == BIG
    # Cache-Control: no-transform.
    _, headers, _, _ = post(gw, "/api/n?h-cache-control=no-transform", *ae)
    assert "content-encoding" not in headers
    # An Api without the filter.
    _, headers, _, _ = post(gw, "/plain/x", *ae)
    assert "content-encoding" not in headers and "vary" not in headers


def test_a_strong_etag_becomes_weak_when_the_bytes_change(gw):
    _, headers, _, _ = post(gw, "/api/x?h-etag=%22v1%22", "-H", "accept-encoding: gzip")
    assert headers["content-encoding"] == "gzip" and headers["etag"] == 'W/"v1"'
    _, headers, _, _ = post(gw, "/api/x?h-etag=%22v1%22")
    assert headers["etag"] == '"v1"'


def test_a_large_streamed_response_compresses_intact(gw, tmp_path):
    payload = bytes(range(256)) * 4096  # 1 MiB, echoed back inside JSON as latin-1
    f = tmp_path / "payload.bin"
    f.write_bytes(payload)
    status, headers, body, _ = curl(gw.url + "/api/big", "-X", "POST", "--data-binary", f"@{f}",
                                    "-H", "accept-encoding: br", timeout=30)
    assert status == 200 and headers["content-encoding"] == "br"
    echoed = json.loads(brotli.decompress(body))["body"].encode("latin-1")
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_the_cache_keeps_the_uncompressed_body_and_serves_every_client(gw, backend):
    first = curl(gw.url + "/cached/doc?pad=" + "y" * 1500, "-H", "accept-encoding: gzip")
    assert first[1]["x-cache"] == "MISS" and first[1]["content-encoding"] == "gzip"
    plain = curl(gw.url + "/cached/doc?pad=" + "y" * 1500)
    assert plain[1]["x-cache"] == "HIT" and "content-encoding" not in plain[1]
    br = curl(gw.url + "/cached/doc?pad=" + "y" * 1500, "-H", "accept-encoding: br")
    assert br[1]["x-cache"] == "HIT" and br[1]["content-encoding"] == "br"
    assert json.loads(plain[2]) == json.loads(gzip.decompress(first[2])) == json.loads(brotli.decompress(br[2]))
    assert backend.count() == 1


@pytest.mark.parametrize("items, message", [
    (('{name: cache}', '{name: compress}'), "spec.filters.1: put compress before cache (spec.filters.0)"),
    (('{name: compress, config: {encodings: [deflate]}}',), 'spec.filters.0.config.encodings.0: unknown encoding "deflate"'),
    (('{name: compress, config: {types: [json]}}',), 'spec.filters.0.config.types.0: "json" is not a media type'),
])
def test_bad_compress_config_is_reported_with_file_and_line(tmp_path, items, message):
    out = validate_bad(tmp_path, service("up", Addr("127.0.0.1:9"))
                       + api("a", "/a", "{service: up}", extra=filters(*items)))
    assert f"Api/a: {message}" in out, out
