"""segx: semantic segmentation experiments on Pascal VOC."""
