"""fewstep gather: merge the K shard folders of a sample set (`fewstep sample --shard I/K`) into
the set itself, byte for byte what the unsharded `fewstep sample` writes (manifest and PNGs;
provenance.json lists the shards' provenance), after checking that the folders are exactly the
K shards of one set and every image against its hash (fewstep/shards.py)."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--shards", required=True, nargs="+", metavar="DIR",
                   help="the set's K shard folders (fewstep sample --shard I/K), in any order")
    p.add_argument("--out", required=True, help="the sample-set folder to write")


def run(args):
    from fewstep.shards import gather

    ident = gather(args.shards, args.out, config=vars(args))
    print(f"gathered {len(args.shards)} shards ({ident['jobs']} images; {ident['family']}, "
          f"{ident['method']}, NFE {ident['nfe']}) into {args.out}")
