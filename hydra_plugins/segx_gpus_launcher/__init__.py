"""segx's Hydra launcher plugin (Hydra only loads launchers from the `hydra_plugins` namespace)."""
