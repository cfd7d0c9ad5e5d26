"""``sendvae demo``: the embedded default, a miniature Send-VAE study on a laptop CPU.

:mod:`sendvae.demo.config` holds its settings and scales (importable without torch);
:mod:`sendvae.demo.study` runs the steps and writes the report (:func:`sendvae.demo.study.run_demo`).
"""
