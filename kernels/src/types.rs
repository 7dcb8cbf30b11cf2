//! Type tags for weight rows and activation rows, with their block geometry.
//!
//! A weight type is always multiplied against one activation format, the one
//! llama.cpp's CPU backend pairs with it (`vec_dot_type`); [`WeightType::act_type`]
//! encodes that pairing so our results can match ggml's.

use crate::blocks::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1,
    BlockQ8K, QK, QK_K,
};

/// Storage format of a weight row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// Format an activation row is converted to before a dot product with weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q8_1,
    Q8K,
}

impl WeightType {
    /// Every weight type, in ggml's type-id order.
    pub const ALL: [WeightType; 11] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q5_0,
        WeightType::Q5_1,
        WeightType::Q8_0,
        WeightType::Q4K,
        WeightType::Q5K,
        WeightType::Q6K,
        WeightType::BF16,
    ];

    /// The name llama.cpp prints for this type.
    pub fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "F32",
            WeightType::F16 => "F16",
            WeightType::BF16 => "BF16",
            WeightType::Q4_0 => "Q4_0",
            WeightType::Q4_1 => "Q4_1",
            WeightType::Q5_0 => "Q5_0",
            WeightType::Q5_1 => "Q5_1",
            WeightType::Q8_0 => "Q8_0",
            WeightType::Q4K => "Q4_K",
            WeightType::Q5K => "Q5_K",
            WeightType::Q6K => "Q6_K",
        }
    }

    /// Elements per block; row lengths must be a multiple of this.
    pub fn block_size(self) -> usize {
        match self {
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => 1,
            WeightType::Q4_0
            | WeightType::Q4_1
            | WeightType::Q5_0
            | WeightType::Q5_1
            | WeightType::Q8_0 => QK,
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightType::F32 => 4,
            WeightType::F16 | WeightType::BF16 => 2,
            WeightType::Q4_0 => size_of::<BlockQ4_0>(),
            WeightType::Q4_1 => size_of::<BlockQ4_1>(),
            WeightType::Q5_0 => size_of::<BlockQ5_0>(),
            WeightType::Q5_1 => size_of::<BlockQ5_1>(),
            WeightType::Q8_0 => size_of::<BlockQ8_0>(),
            WeightType::Q4K => size_of::<BlockQ4K>(),
            WeightType::Q5K => size_of::<BlockQ5K>(),
            WeightType::Q6K => size_of::<BlockQ6K>(),
        }
    }

    /// Bytes of a row of `n` elements, or `None` if `n` is not a multiple of
    /// the block size.
    pub fn checked_row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_size())
            .then(|| n / self.block_size() * self.block_bytes())
    }

    /// Bytes of a row of `n` elements.
    ///
    /// # Panics
    /// If `n` is not a multiple of [`Self::block_size`].
    pub fn row_bytes(self, n: usize) -> usize {
        self.checked_row_bytes(n).unwrap_or_else(|| {
            panic!(
                "{}: row length {n} is not a multiple of {}",
                self.name(),
                self.block_size()
            )
        })
    }

    /// The activation format llama.cpp's CPU backend multiplies this type
    /// against.
    pub fn act_type(self) -> ActType {
        match self {
            WeightType::F32 => ActType::F32,
            WeightType::F16 => ActType::F16,
            WeightType::BF16 => ActType::BF16,
            WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => ActType::Q8_0,
            WeightType::Q4_1 | WeightType::Q5_1 => ActType::Q8_1,
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => ActType::Q8K,
        }
    }
}

impl ActType {
    /// The name llama.cpp prints for this type.
    pub fn name(self) -> &'static str {
        match self {
            ActType::F32 => "F32",
            ActType::F16 => "F16",
            ActType::BF16 => "BF16",
            ActType::Q8_0 => "Q8_0",
            ActType::Q8_1 => "Q8_1",
            ActType::Q8K => "Q8_K",
        }
    }

    /// Elements per block; row lengths must be a multiple of this.
    pub fn block_size(self) -> usize {
        match self {
            ActType::F32 | ActType::F16 | ActType::BF16 => 1,
            ActType::Q8_0 | ActType::Q8_1 => QK,
            ActType::Q8K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            ActType::F32 => 4,
            ActType::F16 | ActType::BF16 => 2,
            ActType::Q8_0 => size_of::<BlockQ8_0>(),
            ActType::Q8_1 => size_of::<BlockQ8_1>(),
            ActType::Q8K => size_of::<BlockQ8K>(),
        }
    }

    /// Bytes of a row of `n` elements, or `None` if `n` is not a multiple of
    /// the block size.
    pub fn checked_row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_size())
            .then(|| n / self.block_size() * self.block_bytes())
    }

    /// Bytes of a row of `n` elements.
    ///
    /// # Panics
    /// If `n` is not a multiple of [`Self::block_size`].
    pub fn row_bytes(self, n: usize) -> usize {
        self.checked_row_bytes(n).unwrap_or_else(|| {
            panic!(
                "{}: row length {n} is not a multiple of {}",
                self.name(),
                self.block_size()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_ggml() {
        // (type, block size, block bytes) as ggml's type_traits lists them.
        let expected = [
            (WeightType::F32, 1, 4),
            (WeightType::F16, 1, 2),
            (WeightType::BF16, 1, 2),
            (WeightType::Q4_0, 32, 18),
            (WeightType::Q4_1, 32, 20),
            (WeightType::Q5_0, 32, 22),
            (WeightType::Q5_1, 32, 24),
            (WeightType::Q8_0, 32, 34),
            (WeightType::Q4K, 256, 144),
            (WeightType::Q5K, 256, 176),
            (WeightType::Q6K, 256, 210),
        ];
        for (ty, bs, bb) in expected {
            assert_eq!((ty.block_size(), ty.block_bytes()), (bs, bb), "{ty:?}");
            assert_eq!(ty.row_bytes(2 * bs), 2 * bb, "{ty:?}");
        }
        assert_eq!(ActType::Q8_1.row_bytes(64), 72);
        assert_eq!(ActType::Q8K.row_bytes(512), 584);
        assert_eq!(ActType::BF16.row_bytes(3), 6);
        assert_eq!(WeightType::Q4K.checked_row_bytes(300), None);
        assert_eq!(WeightType::ALL.len(), 11);
    }

    #[test]
    fn activation_pairing_matches_llama_cpp() {
        use WeightType as W;
        let pairs = [
            (W::F32, ActType::F32),
            (W::F16, ActType::F16),
            (W::BF16, ActType::BF16),
            (W::Q4_0, ActType::Q8_0),
            (W::Q5_0, ActType::Q8_0),
            (W::Q8_0, ActType::Q8_0),
            (W::Q4_1, ActType::Q8_1),
            (W::Q5_1, ActType::Q8_1),
            (W::Q4K, ActType::Q8K),
            (W::Q5K, ActType::Q8K),
            (W::Q6K, ActType::Q8K),
        ];
        for (w, a) in pairs {
            assert_eq!(w.act_type(), a, "{w:?}");
        }
    }
}
