//! `QLinear`: one linear layer abstraction for every dtype and quant format.
//! The CPU reference dequantises a row at a time, so quantised weights stay
//! quantised in memory and the maths is exactly "dequantise, then f32 dot".

use rayon::prelude::*;

use crate::tensor::{QTensor, WeightVec};

#[derive(Clone, Debug)]
pub struct QLinear {
    /// `[out_features, in_features]`, PyTorch order.
    pub weight: QTensor,
    pub bias: Option<WeightVec>,
}

impl QLinear {
    /// A layer from a weight and bias values (tests and converters).
    pub fn new(weight: QTensor, bias: Option<Vec<f32>>) -> Self {
        let bias = bias.map(|b| WeightVec::from_values(format!("{}.bias", weight.name), b));
        QLinear { weight, bias }
    }

    /// A layer whose bias is a stored tensor (the model builder).
    pub fn with_bias(weight: QTensor, bias: Option<WeightVec>) -> Self {
        QLinear { weight, bias }
    }

    pub fn out_features(&self) -> usize {
        self.weight.rows()
    }

    pub fn in_features(&self) -> usize {
        self.weight.cols()
    }

    /// `y = x @ W.T + b` for `x` of shape (T, in); returns (T, out).
    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let (n_out, n_in) = (self.out_features(), self.in_features());
        assert_eq!(x.len(), t * n_in, "{}: input is not (T, {n_in})", self.weight.name);
        // Work in (out, T) so each thread owns whole output rows, dequantises
        // each weight row once, and reuses it for all T inputs.
        const ROWS_PER_TASK: usize = 16;
        let mut yt = vec![0f32; n_out * t];
        yt.par_chunks_mut(ROWS_PER_TASK * t)
            .enumerate()
            .for_each(|(chunk, out)| {
                let mut w = vec![0f32; n_in];
                for (i, y_row) in out.chunks_mut(t).enumerate() {
                    let r = chunk * ROWS_PER_TASK + i;
                    self.weight.dequantize_row(r, &mut w);
                    let b = self.bias.as_ref().map_or(0.0, |b| b[r]);
                    for (ti, y) in y_row.iter_mut().enumerate() {
                        *y = dot(&w, &x[ti * n_in..(ti + 1) * n_in]) + b;
                    }
                }
            });
        let mut y = vec![0f32; t * n_out];
        for r in 0..n_out {
            for ti in 0..t {
                y[ti * n_out + r] = yt[r * t + ti];
            }
        }
        y
    }
}

/// Dot product with 8 independent accumulators so the compiler can vectorise
/// it; the summation order differs from a naive loop only by rounding.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for j in 0..8 {
            acc[j] += a[i * 8 + j] * b[i * 8 + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DType, quantize};

    #[test]
    fn forward_matches_naive_matmul_for_each_format() {
        let (n_out, n_in, t) = (37, 64, 3);
        let w: Vec<f32> = (0..n_out * n_in)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..t * n_in).map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0).collect();
        let bias: Vec<f32> = (0..n_out).map(|i| i as f32 * 0.01).collect();
        for dt in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
        ] {
            let q = QTensor::from_bytes("w", dt, vec![n_out, n_in], quantize(dt, &w));
            let wd = q.to_f32();
            let lin = QLinear::new(q, Some(bias.clone()));
            let y = lin.forward(&x, t);
            for ti in 0..t {
                for r in 0..n_out {
                    let want: f32 = (0..n_in).map(|k| wd[r * n_in + k] * x[ti * n_in + k]).sum::<f32>() + bias[r];
                    let got = y[ti * n_out + r];
                    assert!((got - want).abs() < 1e-4, "{dt}: y[{ti}][{r}] = {got}, want {want}");
                }
            }
        }
    }
}
