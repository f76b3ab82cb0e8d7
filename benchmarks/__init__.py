"""Side-by-side benchmarks for llmgine_ws.

Every benchmark runs the system under test and a baseline server in the same run, alternating
between them, and reports the ratio of their medians: see ``benchmarks/README.md``.

Modules:

- ``_serve``     child-process entry point: runs one uvicorn server on an inherited socket.
- ``_server``    :class:`~benchmarks._server.ServerProcess`: start, wait-until-ready, CPU probe, stop.
- ``_loadgen``   the load generator: :class:`~benchmarks._loadgen.Workload`, measurement windows,
                 in-process or multi-process drivers.
- ``_harness``   the A/B orchestration, statistics, table and JSON output, shared CLI options.
- ``workloads``  concrete workloads (``PingWorkload``).
- ``bare_echo``  the baseline app: bare Starlette + msgspec ping echo.
- ``roundtrip``  CLI: ping round trips per second, target vs baseline.
- ``fanout``     CLI: broadcast fan-out time to 1,000/3,000 clients, with and without a stalled
                 client, llmgine_ws (``fanout_app``) vs a bare loop over sockets (``bare_fanout``).
- ``memory``     CLI: server RSS per idle connection (vs bare Starlette) and RSS across churn rounds.
- ``_rawws``     a minimal asyncio-protocol WebSocket client, cheap enough for thousands per process.
"""
