"""Benchmarks for the broker's prompt path: `python -m bench --help`.

One run starts a fast fake ComfyUI, two bare pass-through proxies as floors (FastAPI with
httpx's default client, FastAPI with aiohttp) and the broker itself, and drives each with the
same load generator, side by side. See `docs/benchmarks.md` for results and method.
"""
