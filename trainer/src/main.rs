//! `trainer`: data generation, pretraining, fine-tuning, evaluation, compression, packaging and
//! rollout of the edge defect detector. The commands live in `trainer::commands`.

// Every tensor op allocates; mimalloc keeps freed blocks for reuse instead of returning them
// to the kernel, which saves page faults on every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    edge_detector::cpu::hold_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            // rumqttd (the demo's broker) logs every connection at info; pliron (the CUDA
            // backend's LLVM IR passes) logs every kernel's IR at info.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn,cubecl_common=error,pliron=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = trainer::commands::Cli::parse();
    // Evaluation and compression run the CPU kernels: a bad EDGE_CPU_KERNELS is an error here.
    edge_detector::cpu::select_from_env().map_err(anyhow::Error::msg)?;
    trainer::commands::run(cli)
}
