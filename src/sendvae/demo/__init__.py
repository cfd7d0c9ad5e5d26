"""``sendvae demo``: the embedded default, a miniature Send-VAE study on a laptop CPU.

:mod:`sendvae.demo.config` holds its settings and scales (importable without torch);
:func:`sendvae.demo.study.run_demo` runs the plan of steps (:mod:`~sendvae.demo.plan`) whose work lives
in the study's parts: :mod:`~sendvae.demo.vaes` (data, base VAE, fine-tunes), :mod:`~sendvae.demo.probes`,
:mod:`~sendvae.demo.evaluation` (classifiers, reconstructions), :mod:`~sendvae.demo.generation` (SiTs
measured along training), and the report (:mod:`~sendvae.demo.report`, :mod:`~sendvae.demo.findings`).
"""
