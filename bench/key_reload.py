"""What a key set costs the service when it comes back into memory, in the two forms Concrete knows.

    python bench/key_reload.py                # shipped PneumoniaMNIST circuit, 4 rounds
    python bench/key_reload.py --rounds 8

The shipped circuit's evaluation keys are *seed-compressed* (56 MiB): Concrete keeps the seeded
bytes and expands them on the first run (a pseudo-random generator fills the masks), so a
prepared key set holds both forms. The same keys can also be made *uncompressed* (the circuit's
key specs with ``compression: none``, from the same secret keys): nothing to expand, but the
upload and every stored copy is four times larger, and deserializing copies all of it.

For each form, alternately and ``--rounds`` times, in one process on an otherwise idle machine:
deserialize, first run, second run (the warm-up ciphertext of a real client), and the memory the
prepared key set holds; between rounds the keys are freed and memory is trimmed, as the service's
key store does on eviction. The first run's extra time plus deserializing is the reload's cost.
Both forms come from the same secret keys, so they must decrypt to the same answer; each form
must give the same result bytes in every run.

Writes bench/results/key_reload.json. Feeds ``bench/tenants_bound.py --reload-s``: the report's
reload under load scaled by the ratio measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from engine.fhe.keys import FHEClient, evaluation_keys_for
from engine.fhe.runtime import FHEServer
from engine.fhe.threads import release_memory
from engine.fhe.footprint import rss_bytes
from engine.study.evaluate import machine_info

REPO = Path(__file__).resolve().parent.parent

GIB = 2**30
CIRCUIT = REPO / "models" / "pneumoniamnist" / "fcnn-16-w2a2i3-pool3" / "circuit"


def uncompressed_program_info(program_info):
    """``program_info`` with every evaluation key stored without seed compression."""
    from concrete.compiler import ProgramInfo

    specs = json.loads(program_info.serialize())
    keyset = specs["keyset"]
    for key in keyset.get("lweBootstrapKeys", []) + keyset.get("lweKeyswitchKeys", []):
        key["compression"] = "none"
    return ProgramInfo.deserialize(json.dumps(specs).encode())


def one_reload(server: FHEServer, body: bytes, ciphertext: bytes) -> dict:
    from concrete.compiler import ServerKeyset

    before = rss_bytes()
    t0 = time.perf_counter()
    keys = ServerKeyset.deserialize(body)
    t1 = time.perf_counter()
    first = server.execute(ciphertext, keys)
    t2 = time.perf_counter()
    second = server.execute(ciphertext, keys)
    t3 = time.perf_counter()
    held = rss_bytes() - before
    del keys
    release_memory()
    return {"deserialize_s": t1 - t0, "first_run_s": t2 - t1, "second_run_s": t3 - t2,
            "reload_s": (t1 - t0) + (t2 - t1) - (t3 - t2), "held_bytes": held,
            "result": first, "stable": first == second}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--circuit", type=Path, default=CIRCUIT)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    deployment = a.circuit / "deployment"
    library = a.circuit / "warmup" / "library.zip"

    client = FHEClient(deployment)
    client.keygen()
    forms = {"seeded": client.evaluation_keys(),
             "uncompressed": evaluation_keys_for(client._keyset, uncompressed_program_info(client.program_info))}  # noqa: SLF001
    ciphertext = client.encrypt(np.zeros(client.input_shape))
    server = FHEServer(deployment, library if library.exists() else None)
    one_reload(server, forms["seeded"], ciphertext)  # the circuit's own first run, paid once

    rounds: dict[str, list[dict]] = {name: [] for name in forms}
    for i in range(a.rounds):
        for name, body in forms.items():
            r = one_reload(server, body, ciphertext)
            rounds[name].append(r)
            print(f"round {i + 1} {name:12s} deserialize {r['deserialize_s']:.3f} s, first run "
                  f"{r['first_run_s']:.3f} s, second {r['second_run_s']:.3f} s, held "
                  f"{r['held_bytes'] / 2**20:.0f} MiB", flush=True)
    # Two key generations from the same secret keys (fresh noise each): the result bytes differ
    # between the forms, the decrypted answers may not; within a form every run gives the same bytes.
    answers = {client.decrypt(r["result"]).tobytes() for rs in rounds.values() for r in rs}
    same = all(len({r["result"] for r in rs}) == 1 and all(r["stable"] for r in rs)
               for rs in rounds.values()) and len(answers) == 1

    summary = {}
    for name, rs in rounds.items():
        held = statistics.median(r["held_bytes"] for r in rs)
        summary[name] = {
            "serialized_bytes": len(forms[name]),
            "deserialize_s_median": statistics.median(r["deserialize_s"] for r in rs),
            "first_run_extra_s_median": statistics.median(r["first_run_s"] - r["second_run_s"] for r in rs),
            "reload_s_median": statistics.median(r["reload_s"] for r in rs),
            "held_bytes_median": held,
            "key_sets_in_1GiB": int(GIB // held) if held > 0 else None,
        }
    ratio = summary["uncompressed"]["reload_s_median"] / summary["seeded"]["reload_s_median"]
    out = {"machine": machine_info(), "rounds": a.rounds, "same_results": same, "forms": summary,
           "reload_ratio_uncompressed_to_seeded": ratio}
    tenants = REPO / "bench" / "results" / "tenants.json"
    if tenants.exists():
        load = json.loads(tenants.read_text()).get("load", {})  # the costs tenants_bound.py takes
        run_s = load.get("c8_4gib", {}).get("server_s_median")
        reload_s = load.get("c8_1gib", {}).get("server_key_reload_s_median")
        if run_s and reload_s:
            out["reload_under_load_s"] = {"seeded": reload_s - run_s, "uncompressed_scaled": (reload_s - run_s) * ratio}
    (REPO / "bench" / "results" / "key_reload.json").write_text(json.dumps(out, indent=2) + "\n")

    print("\n| form | serialized | deserialize | first run's extra | reload | memory held | key sets in 1 GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['serialized_bytes'] / 2**20:.1f} MiB | {s['deserialize_s_median']:.3f} s | "
              f"{s['first_run_extra_s_median']:.3f} s | {s['reload_s_median']:.3f} s | "
              f"{s['held_bytes_median'] / 2**20:.0f} MiB | {s['key_sets_in_1GiB']} |")
    print(f"\nsame answer from both forms, same bytes within each, in every run: {'yes' if same else 'NO'}")
    if "reload_under_load_s" in out:
        r = out["reload_under_load_s"]
        print(f"reload under load (tenants.json): seeded {r['seeded']:.2f} s; uncompressed, scaled by "
              f"{ratio:.2f}: {r['uncompressed_scaled']:.2f} s -> python bench/tenants_bound.py "
              f"--reload-s {r['uncompressed_scaled']:.2f} (rows with {summary['uncompressed']['key_sets_in_1GiB']} key sets)")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
