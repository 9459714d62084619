"""Load client for the HTTP benchmark (run as its own process so it never shares a GIL)."""

from __future__ import annotations

import json
import socket
import statistics
import sys
import threading
import time

import httpx


def main() -> None:
    url, key, requests, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {key}"}
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = requests // concurrency

    def worker() -> None:
        # Without TCP_NODELAY, headers and body go out as two segments and Nagle plus delayed
        # ACKs add ~40 ms to every request.
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        transport = httpx.HTTPTransport(socket_options=nodelay)
        with httpx.Client(timeout=30, transport=transport) as client:
            client.post(url, json=body, headers=headers).raise_for_status()  # warm the connection
            for _ in range(per_thread):
                start = time.perf_counter()
                response = client.post(url, json=body, headers=headers)
                elapsed = time.perf_counter() - start
                response.raise_for_status()
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "rps": len(latencies) / seconds,
                "p50_ms": statistics.median(latencies) * 1000,
                "p90_ms": statistics.quantiles(latencies, n=10)[-1] * 1000,
            }
        )
    )


if __name__ == "__main__":
    main()
