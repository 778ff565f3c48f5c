//! Training on the CPU through the hand-written kernels: custom autodiff operations on burn's
//! Flex backend, each a forward kernel from [`crate::kernels`] and a backward pass written for
//! it, in place of the chain of burn ops (and their recorded graph) the same layer would take.
//!
//! - **GELU**: the vectorised forward, and `grad * (Phi(x) + x phi(x))` in one pass (burn's
//!   backward evaluates a scalar libm `erf` and `exp` per element).
//! - **Window copies**: roll + pad + partition in one gather, and back in one scatter; each is
//!   the other's backward pass (every image position sits in exactly one window).
//! - **Window attention**: the fused forward; the backward recomputes each window's softmax and
//!   writes the gradients of q, k, v straight into the qkv projection's layout, and of the
//!   bias (relative positions plus shift mask) summed over windows (burn's path splits heads,
//!   records a batched matmul, softmax and another matmul, and merges the heads back).
//!
//! They apply where [`applies`] says: an autodiff device on Flex without gradient
//! checkpointing, f32 tensors. Everything else (GPUs, bf16 mixed precision, checkpointing)
//! keeps burn's ops. Each backward pass is tested against burn's autodiff of the same function.

use burn::prelude::*;
use burn::tensor::{DType, GradientCheckpointingStrategy, TensorData};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, NodeGuard, Ops, OpsKind, unary};
use burn_flex::{Flex, FlexTensor};

use crate::cpu::{self, KernelPath};
use crate::kernels::{self, AttentionShape};

type Ad = Autodiff<Flex>;

/// Whether the custom operations can run on this tensor: an autodiff device on Flex, without
/// gradient checkpointing, f32.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    let device = x.device();
    device.is_autodiff()
        && device == Device::flex()
        && device.gradient_checkpointing_strategy() == Some(GradientCheckpointingStrategy::Disabled)
        && x.dtype() == DType::F32
}

/// The Flex tensor inside a tensor [`applies`] accepted, and its node in the graph.
fn parts<const D: usize>(x: Tensor<D>) -> (FlexTensor, NodeGuard) {
    x.try_into_primitive::<Ad>()
        .expect("an f32 tensor on Flex with autodiff")
        .into_parts()
}

/// A contiguous f32 Flex tensor (copied only when it is a strided view).
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn dims<const D: usize>(t: &FlexTensor) -> [usize; D] {
    let shape = t.layout().shape();
    std::array::from_fn(|i| shape[i])
}

/// `out` as the result of `op` on the tensors behind `nodes`: recorded in the graph with
/// `state` for its backward pass when an input tracks gradients.
fn record<O, const N: usize, const D: usize>(
    op: O,
    nodes: [NodeGuard; N],
    state: O::State,
    out: FlexTensor,
) -> Tensor<D>
where
    O: Backward<Flex, N>,
{
    let result = match op
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive::<Ad>(result)
}

/// Exact (erf) GELU with its fused backward pass.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    gelu_with(cpu::active(), x)
}

/// As [`gelu`] on a given path (one this CPU supports).
pub fn gelu_with<const D: usize>(path: KernelPath, x: Tensor<D>) -> Tensor<D> {
    #[derive(Debug)]
    struct Gelu;

    impl Backward<Flex, 1> for Gelu {
        type State = (KernelPath, FlexTensor); // the input

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (path, x) = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
                let shape = grad.layout().shape().clone();
                let mut grad = values(&contiguous(grad)).to_vec();
                kernels::gelu_grad_in_place_with(path, values(&x), &mut grad);
                FlexTensor::from_data(TensorData::new(grad, shape))
            });
        }
    }

    let shape = x.dims();
    let (input, node) = parts(x);
    let input = contiguous(input);
    let mut out = values(&input).to_vec();
    kernels::gelu_in_place_with(path, &mut out);
    let out = tensor(out, shape);
    record(Gelu, [node], (path, input), out)
}

/// Where a window copy goes: the window, the shift and the image's `[b, h, w]`.
#[derive(Clone, Copy, Debug)]
struct WindowLayout {
    window: [usize; 2],
    shift: [usize; 2],
    image: [usize; 3],
}

/// [`kernels::windows_from_image`] under autodiff.
pub fn windows_from_image(x: Tensor<4>, window: [usize; 2], shift: [usize; 2]) -> Tensor<3> {
    #[derive(Debug)]
    struct Gather;

    impl Backward<Flex, 1> for Gather {
        type State = (WindowLayout, usize);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (layout, c) = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
                let grad = contiguous(grad);
                let [n, _] = [layout.window[0] * layout.window[1], c];
                let out = kernels::scatter_windows(
                    values(&grad),
                    [n, c],
                    layout.window,
                    layout.shift,
                    layout.image,
                );
                let [b, h, w] = layout.image;
                tensor(out, [b, h, w, c])
            });
        }
    }

    let [b, h, w, c] = x.dims();
    let layout = WindowLayout {
        window,
        shift,
        image: [b, h, w],
    };
    let (input, node) = parts(x);
    let input = contiguous(input);
    let (out, out_dims) = kernels::gather_windows(values(&input), [b, h, w, c], window, shift);
    let out = tensor(out, out_dims);
    record(Gather, [node], (layout, c), out)
}

/// [`kernels::image_from_windows`] under autodiff.
pub fn image_from_windows(
    windows: Tensor<3>,
    window: [usize; 2],
    shift: [usize; 2],
    image: [usize; 3],
) -> Tensor<4> {
    #[derive(Debug)]
    struct Scatter;

    impl Backward<Flex, 1> for Scatter {
        type State = (WindowLayout, usize);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (layout, c) = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
                let grad = contiguous(grad);
                let [b, h, w] = layout.image;
                let (out, out_dims) = kernels::gather_windows(
                    values(&grad),
                    [b, h, w, c],
                    layout.window,
                    layout.shift,
                );
                tensor(out, out_dims)
            });
        }
    }

    let [_, n, c] = windows.dims();
    let layout = WindowLayout {
        window,
        shift,
        image,
    };
    let (input, node) = parts(windows);
    let input = contiguous(input);
    let out = kernels::scatter_windows(values(&input), [n, c], window, shift, image);
    let [b, h, w] = image;
    let out = tensor(out, [b, h, w, c]);
    record(Scatter, [node], (layout, c), out)
}

/// [`kernels::window_attention`] under autodiff: gradients for `qkv` and `bias`.
pub fn window_attention(
    path: KernelPath,
    qkv: Tensor<3>,
    bias: Tensor<4>,
    heads: usize,
    scale: f32,
) -> Tensor<3> {
    #[derive(Debug)]
    struct Attention;

    #[derive(Clone, Debug)]
    struct Saved {
        path: KernelPath,
        shape: AttentionShape,
        qkv: FlexTensor,
        bias: FlexTensor,
    }

    impl Backward<Flex, 2> for Attention {
        type State = Saved;

        fn backward(self, ops: Ops<Saved, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let Saved {
                path,
                shape,
                qkv,
                bias,
            } = ops.state;
            let [qkv_parent, bias_parent] = ops.parents;
            let grad = contiguous(grads.consume::<Flex>(&ops.node));
            let (grad_qkv, grad_bias) = kernels::attention_backward(
                path,
                &shape,
                values(&qkv),
                values(&bias),
                values(&grad),
            );
            if let Some(node) = qkv_parent {
                grads.register::<Flex>(node.id, tensor(grad_qkv, dims::<3>(&qkv)));
            }
            if let Some(node) = bias_parent {
                grads.register::<Flex>(node.id, tensor(grad_bias, dims::<4>(&bias)));
            }
        }
    }

    let [windows, n, three_dim] = qkv.dims();
    let dim = three_dim / 3;
    let shape = AttentionShape::new(n, dim, heads, scale);
    let (qkv, qkv_node) = parts(qkv);
    let (bias, bias_node) = parts(bias);
    let (qkv, bias) = (contiguous(qkv), contiguous(bias));
    let out = kernels::attention_forward(path, &shape, values(&qkv), values(&bias));
    let out = tensor(out, [windows, n, dim]);
    let saved = Saved {
        path,
        shape,
        qkv,
        bias,
    };
    record(Attention, [qkv_node, bias_node], saved, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::activation::{gelu as burn_gelu, softmax};

    fn device() -> Device {
        Device::flex().autodiff()
    }

    fn values_of<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().expect("f32")
    }

    fn assert_close(what: &str, ours: &[f32], theirs: &[f32], tolerance: f32) {
        assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
        let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= tolerance * scale,
            "{what}: max difference {worst} against max magnitude {scale}"
        );
        assert!(ours.iter().any(|v| *v != 0.0), "{what}: all zero");
    }

    /// A random tensor that requires a gradient, and a copy of it that does too.
    fn pair<const D: usize>(shape: [usize; D], spread: f64) -> (Tensor<D>, Tensor<D>) {
        let base = Tensor::<D>::random(shape, Distribution::Normal(0.0, spread), &Device::flex());
        let data = base.into_data();
        (
            Tensor::from_data(data.clone(), &device()).require_grad(),
            Tensor::from_data(data, &device()).require_grad(),
        )
    }

    #[test]
    fn applies_only_to_f32_on_flex_with_autodiff() {
        let x = Tensor::<2>::zeros([2, 3], &device());
        assert!(applies(&x));
        assert!(!applies(&Tensor::<2>::zeros([2, 3], &Device::flex())));
        assert!(!applies(&x.cast(DType::BF16)));
        let checkpointed = Device::flex().autodiff().gradient_checkpointing();
        assert!(!applies(&Tensor::<2>::zeros([2, 3], &checkpointed)));
    }

    #[test]
    fn gelu_gradient_matches_burns() {
        for path in KernelPath::ALL.into_iter().filter(|p| p.supported()) {
            // Past both chunk sizes, values out to +-6 (where erf saturates).
            let (a, b) = pair([3, 20_011], 2.0);
            let weights = Tensor::<2>::random([3, 20_011], Distribution::Default, &device());
            let ours = gelu_with(path, a.clone());
            let theirs = burn_gelu(b.clone());
            assert_close(
                "gelu forward",
                &values_of(ours.clone()),
                &values_of(theirs.clone()),
                1e-6,
            );
            let grads_ours = (ours * weights.clone()).sum().backward();
            let grads_theirs = (theirs * weights).sum().backward();
            assert_close(
                &format!("gelu gradient on {path}"),
                &values_of(a.grad(&grads_ours).expect("gradient")),
                &values_of(b.grad(&grads_theirs).expect("gradient")),
                1e-5,
            );
        }
    }

    /// burn's roll / pad / partition (and back), as the Swin block computes them without the
    /// kernels.
    fn reference_windows(x: Tensor<4>, window: [usize; 2], shift: [usize; 2]) -> Tensor<3> {
        let [b, h, w, c] = x.dims();
        let x = x.roll(&[-(shift[0] as i64), -(shift[1] as i64)], &[1, 2]);
        let (ph, pw) = (
            (window[0] - h % window[0]) % window[0],
            (window[1] - w % window[1]) % window[1],
        );
        let x = x.pad(
            [(0, ph), (0, pw), (0, 0)],
            burn::tensor::ops::PadMode::Constant(0.0),
        );
        let (hp, wp) = (h + ph, w + pw);
        x.reshape([b, hp / window[0], window[0], wp / window[1], window[1], c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([
                b * (hp / window[0]) * (wp / window[1]),
                window[0] * window[1],
                c,
            ])
    }

    #[test]
    fn window_copies_gradients_match_burns() {
        // 10 x 9 image, 7 x 7 windows: padding on both axes, and a shift.
        let (window, shift, [b, h, w, c]) = ([7, 7], [3, 3], [2, 10, 9, 5]);
        let (a, r) = pair([b, h, w, c], 1.0);
        let ours = windows_from_image(a.clone(), window, shift);
        let theirs = reference_windows(r.clone(), window, shift);
        assert_eq!(values_of(ours.clone()), values_of(theirs.clone()));
        let weights = Tensor::<3>::random(ours.dims(), Distribution::Default, &device());
        let g_ours = (ours * weights.clone()).sum().backward();
        let g_theirs = (theirs * weights).sum().backward();
        assert_eq!(
            values_of(a.grad(&g_ours).expect("gradient")),
            values_of(r.grad(&g_theirs).expect("gradient")),
            "windows_from_image's gradient"
        );

        // And back: image_from_windows is windows_from_image's inverse on the image positions.
        let nw = h.div_ceil(7) * w.div_ceil(7);
        let (a, r) = pair([b * nw, 49, c], 1.0);
        let ours = image_from_windows(a.clone(), window, shift, [b, h, w]);
        let weights = Tensor::<4>::random([b, h, w, c], Distribution::Default, &device());
        let g_ours = (ours.clone() * weights.clone()).sum().backward();
        // The reference: a gather of the windows by their image positions, through burn's ops.
        let index = reference_windows(
            Tensor::<1, Int>::arange(0..(b * h * w) as i64, &device())
                .float()
                .add_scalar(1.0)
                .reshape([b, h, w, 1]),
            window,
            shift,
        ); // 1-based image position per window token, 0 for padding
        let index = values_of(index);
        let a_values = values_of(r.clone());
        let mut expected = vec![0f32; b * h * w * c];
        let mut expected_grad = vec![0f32; b * nw * 49 * c];
        let weight_values = values_of(weights);
        for (token, &position) in index.iter().enumerate() {
            if position > 0.0 {
                let p = position as usize - 1;
                for k in 0..c {
                    expected[p * c + k] = a_values[token * c + k];
                    expected_grad[token * c + k] = weight_values[p * c + k];
                }
            }
        }
        assert_eq!(values_of(ours), expected, "image_from_windows");
        assert_eq!(
            values_of(a.grad(&g_ours).expect("gradient")),
            expected_grad,
            "image_from_windows' gradient"
        );
    }

    #[test]
    fn window_attention_gradients_match_burns() {
        // Every head size the kernel is compiled for (the edge model's is 24, with 2 heads in
        // its first stage) in 7 x 7 windows, and 9 x 9 windows (past the fast path's 64
        // lanes); one shifted stage (a bias per window, with a -100 mask-like block) and one
        // plain (one bias for every window).
        let cases = [
            (2usize, 24usize, 1usize, 49usize),
            (2, 24, 4, 49),
            (2, 16, 4, 49),
            (1, 32, 4, 49),
            (1, 48, 4, 49),
            (1, 64, 4, 49),
            (2, 24, 4, 81),
        ];
        for path in KernelPath::ALL.into_iter().filter(|p| p.supported()) {
            for (heads, hd, bias_windows, n) in cases {
                let windows = 8usize;
                let dim = heads * hd;
                let scale = (hd as f32).powf(-0.5);
                let (qkv_a, qkv_r) = pair([windows, n, 3 * dim], 1.0);
                let (bias_a, bias_r) = pair([bias_windows, heads, n, n], 1.0);
                let mask = Tensor::<4>::from_data(
                    TensorData::new(
                        (0..bias_windows * heads * n * n)
                            .map(|i| {
                                if bias_windows > 1 && (i / n) % 3 == 0 && i % 5 == 0 {
                                    -100.0
                                } else {
                                    0.0
                                }
                            })
                            .collect::<Vec<f32>>(),
                        [bias_windows, heads, n, n],
                    ),
                    &device(),
                );
                let ours = window_attention(
                    path,
                    qkv_a.clone(),
                    bias_a.clone() + mask.clone(),
                    heads,
                    scale,
                );
                // burn's ops, as the block's `Explicit` path computes them.
                let qkv = qkv_r
                    .clone()
                    .reshape([windows, n, 3, heads, hd])
                    .permute([2, 0, 3, 1, 4]);
                let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([windows, heads, n, hd]);
                let (q, k, v) = (part(0), part(1), part(2));
                let bias = (bias_r.clone() + mask)
                    .reshape([1, bias_windows, heads, n, n])
                    .repeat_dim(0, windows / bias_windows)
                    .reshape([windows, heads, n, n]);
                let scores = (q * scale).matmul(k.swap_dims(2, 3)) + bias;
                let theirs = softmax(scores, 3)
                    .matmul(v)
                    .swap_dims(1, 2)
                    .reshape([windows, n, dim]);
                assert_close(
                    &format!("attention forward on {path}"),
                    &values_of(ours.clone()),
                    &values_of(theirs.clone()),
                    2e-5,
                );
                let weights =
                    Tensor::<3>::random([windows, n, dim], Distribution::Default, &device());
                let g_ours = (ours * weights.clone()).sum().backward();
                let g_theirs = (theirs * weights).sum().backward();
                assert_close(
                    &format!(
                        "attention qkv gradient on {path}, head width {hd}, {bias_windows} bias windows"
                    ),
                    &values_of(qkv_a.grad(&g_ours).expect("gradient")),
                    &values_of(qkv_r.grad(&g_theirs).expect("gradient")),
                    1e-4,
                );
                assert_close(
                    &format!(
                        "attention bias gradient on {path}, head width {hd}, {bias_windows} bias windows"
                    ),
                    &values_of(bias_a.grad(&g_ours).expect("gradient")),
                    &values_of(bias_r.grad(&g_theirs).expect("gradient")),
                    1e-4,
                );
            }
        }
    }
}
