"""Image folders in, tensors out, one concern per module:

- `folders`: class discovery (class folders, image files, the flat or train/val/test layout);
- `sampling`: k-shot sampling and splits (`load_training_data`, `load_eval_data`), unreadable images skipped;
- `decode`: robust decoding (`decode_image`, `UnreadableImageError`);
- `transforms`: preprocessing (`Preprocess`, the eval transform, the training augmentation);
- `loader`: datasets, the seeded batch order and the loaders (`ImageDataset`, `SeededBatches`, `make_loader`);
- `inputs`: `predict`'s inputs (paths, folders, globs, PIL images, image tensors).

Every public name is re-exported here, so `from promptune.data import X` works as it did when this was one module.
"""

from promptune.data.decode import UnreadableImageError, decode_image, to_rgb
from promptune.data.folders import (
    IMAGE_EXTENSIONS,
    UPSCALE_WARNING,
    check_distinct_class_names,
    class_folders_of,
    find_layout,
    images_under,
    scan_classes,
    small_image_note,
)
from promptune.data.inputs import prediction_items, tensor_images
from promptune.data.loader import (
    Batch,
    EpochLoader,
    ImageDataset,
    Sample,
    SeededBatches,
    ShardedBatches,
    collate_skipping,
    default_workers,
    derive_seed,
    make_loader,
    set_max_image_pixels,
    worker_init,
)
from promptune.data.sampling import (
    SPLIT_LABELS,
    EvalData,
    ImageItem,
    SkippedFile,
    TrainingData,
    load_eval_data,
    load_training_data,
)
from promptune.data.transforms import (
    TRAIN_CROP_RATIO,
    TRAIN_CROP_SCALE,
    PixelNormalize,
    Preprocess,
    TrainAugment,
    bounded_size,
    build_transform,
    cache_side,
    crop_box,
    prompt_name,
)

__all__ = [
    "IMAGE_EXTENSIONS", "SPLIT_LABELS", "TRAIN_CROP_RATIO", "TRAIN_CROP_SCALE", "UPSCALE_WARNING",
    "Batch", "EpochLoader", "EvalData", "ImageDataset", "ImageItem", "PixelNormalize", "Preprocess", "Sample",
    "SeededBatches", "ShardedBatches", "SkippedFile", "TrainAugment", "TrainingData", "UnreadableImageError",
    "bounded_size", "build_transform", "cache_side", "check_distinct_class_names", "class_folders_of",
    "collate_skipping", "crop_box", "decode_image", "default_workers", "derive_seed", "find_layout", "images_under",
    "load_eval_data", "load_training_data", "make_loader", "prediction_items", "prompt_name", "scan_classes",
    "set_max_image_pixels", "small_image_note", "tensor_images", "to_rgb", "worker_init",
]
