"""Score a checkpoint: `segx-evaluate ckpt=outputs/.../checkpoints/best.ckpt [split=val full_res=true]`."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from segx.core.config_dir import CONF_DIR
from segx.core.errors import exit_on_user_error
from segx.core.files import write_json_atomic
from segx.inference.evaluate import evaluate_checkpoint
from segx.inference.predictor import tta_from_config
from segx.inference.sliding import inference_mode_from_config
from segx.report import confusion_matrix_figure, print_scores


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with exit_on_user_error():
        result = evaluate_checkpoint(
            cfg.ckpt, split=cfg.split, data_overrides=OmegaConf.to_container(cfg.data),
            full_res=cfg.full_res, save_predictions=cfg.save_predictions, out_dir=out_dir,
            batch_size=cfg.batch_size, device=cfg.device, tta=tta_from_config(cfg),
            inference=inference_mode_from_config(cfg), precision=cfg.inference.precision,
        )
    write_json_atomic(out_dir / "metrics.json", result)
    confusion_matrix_figure(result["confusion_matrix"], result["class_names"], out_dir / "confusion_matrix.png",
                            title=f"{cfg.split} split, {result['n_images']} images")
    print_scores(result)
    print(f"metrics.json: {out_dir / 'metrics.json'} (normalised confusion matrix: confusion_matrix.png)")
    return result["miou"]


if __name__ == "__main__":
    main()
