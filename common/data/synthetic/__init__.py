"""The embedded world: a procedural image-caption world, its downstream suite and the tiny CLIPs' pretraining.

- `vocab`: concepts (object kinds with geometry, colours, patterns, scenes, styles) and their words.
- `world.sample_scenes` + `render.render`: deterministic, vectorised scene sampling and drawing.
- `captions`: web alt-text-like captions of a scene.
- `suite`: writes the downstream datasets under data/embedded/ in CoOp's layout (`python -m common.data.synthetic.suite`).
- `datasets`: their registry builders (`emb_*`).
- `pretrain`: contrastive pretraining of `tiny-rn` / `tiny-vit`; `probe`: zero-shot vs linear-probe table.
"""
