"""Ship a generated dataset's responses inside the package, for ``generate.backend=precomputed``.

    python bench/ship_responses.py [--data outputs/laptop-generate/data]
                                   [--name smollm2-135m-laptop] [--force]

Reads the generated Parquet shards (``l2vg generate -c configs/laptop-generate.yaml``) and writes
their ``query`` and ``response`` columns (plus the query ``id`` and the generator's provenance),
sorted by id and zstd-compressed, to the bundled file ``BUNDLED_FILES[name]`` under
``l2vg_ray/resources/``, and a ``.json`` beside it (row count, generator, sampling settings,
the source config hash, the file's SHA-256). Teacher embeddings are not shipped: each setting
recomputes them with its own teacher. An existing file is only replaced with ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

from _common import ROOT


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "outputs" / "laptop-generate" / "data"))
    p.add_argument("--name", default="smollm2-135m-laptop")
    p.add_argument("--config", default="configs/laptop-generate.yaml",
                   help="the config that generated --data (recorded beside the file)")
    p.add_argument("--force", action="store_true")
    args = p.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from l2vg_ray import schema
    from l2vg_ray.dataset import OutputDir, read_generated_table
    from l2vg_ray.generate.queries import BUNDLED_FILES

    out = ROOT / "l2vg_ray" / "resources" / BUNDLED_FILES[args.name]
    if out.exists() and not args.force:
        print(f"{out} exists; --force replaces it", file=sys.stderr)
        return 1
    full = read_generated_table(args.data)
    cols = [schema.ID, schema.QUERY, schema.RESPONSE]
    table = full.select(cols).sort_by(schema.ID)
    generators = sorted(set(full.column(schema.GENERATOR_MODEL).to_pylist()))
    params = sorted(set(full.column(schema.SAMPLING_PARAMS).to_pylist()))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict({c: table.column(c) for c in cols}), out,
                   compression="zstd", compression_level=19)
    manifest = OutputDir.from_path(args.data).read_manifest()
    # the last pass that generated rows (a resumed pass with nothing to do generated none)
    made = [p for p in manifest.get("passes", [manifest]) if p.get("rows_generated")]
    made = made[-1] if made else manifest
    meta = {
        "rows": table.num_rows, "columns": cols, "generator_model": generators,
        "sampling_params": [json.loads(x) for x in params],
        "source_config": args.config,
        "backend": made.get("backend"), "generated_at": made.get("written_at"),
        "bytes": out.stat().st_size, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
