"""`make bench` reads wrk's text output; a misread would report wrong ingress figures."""

import pytest

from scripts.bench_ingress import parse_wrk

OUTPUT = """Running 1s test @ http://127.0.0.1:45901/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.65ms    9.74ms  71.69ms   95.16%
    Req/Sec     4.17k     1.14k    5.19k    90.00%
  Latency Distribution
     50%  323.00us
     75%  760.00us
     90%    1.88ms
     99%    1.20s
  4155 requests in 1.00s, 486.91KB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   4136.36
Transfer/sec:    484.73KB
"""


def test_reads_rate_percentiles_in_microseconds_and_errors() -> None:
    figures = parse_wrk(OUTPUT)
    assert figures["rps"] == 4136.36
    assert figures["p50_us"] == 323.0
    assert figures["p99_us"] == pytest.approx(1.2e6)
    assert figures["requests"] == 4155
    assert figures["errors"] == 7


def test_output_without_figures_is_an_error_not_a_zero() -> None:
    with pytest.raises(ValueError, match="could not parse"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")
