"""Guidance of class-conditional generators (the paper's §3.3, Appendix F): classifier-free
guidance (``cfg``, Algorithm 4), and -- from the reward classifier -- latent classifier guidance
(``latent``, Algorithm 5) with its relaxations (``relax``, F.1) and the reward (``reward``).
Shared layer: imported by sampling and the stages, never importing a stage."""
