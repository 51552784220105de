"""`segx-predict ckpt=... input=<image, folder or glob> output=DIR`: label masks and overlays for images."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from segx.core.config_dir import CONF_DIR
from segx.core.errors import exit_on_user_error
from segx.inference.predict import predict_images
from segx.inference.predictor import tta_from_config
from segx.inference.sliding import inference_mode_from_config


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    """`segx-predict ckpt=... input=... output=...` (Hydra overrides, as train.py takes them)."""
    with exit_on_user_error():
        result = predict_images(cfg.ckpt, cfg.input, cfg.output, batch_size=cfg.batch_size, device=cfg.device,
                                progress=cfg.progress, tta=tta_from_config(cfg),
                                inference=inference_mode_from_config(cfg), precision=cfg.inference.precision)
    print(f"Wrote {len(result.masks)} mask(s) to {result.output} and their overlays to "
          f"{result.output / 'overlays'} ({result.device}, {result.precision}, {result.seconds:.1f} s).")


if __name__ == "__main__":
    main()
