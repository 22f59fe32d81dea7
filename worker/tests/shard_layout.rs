//! The sharded layout at the real size: FLUX.1-dev's weights, from its config alone, cut for
//! the reference recipe's 8 ranks, against `../shared/docs/SHARDING.md`'s per-rank table.

use dancegrpo_worker::flux::{FluxConfig, FluxTransformer};
use dancegrpo_worker::train::policy::tiny_flux_config;
use dancegrpo_worker::train::shard::Layout;
use tch::Kind;
use tch::nn::VarStore;

/// The shapes the config lists are the variables the model creates, name for name.
#[test]
fn weight_shapes_are_the_variables_the_model_creates() {
    let without_guidance =
        FluxConfig { guidance_embeds: false, out_channels: Some(8), ..tiny_flux_config() };
    for cfg in [tiny_flux_config(), without_guidance] {
        let vs = VarStore::new(tch::Device::Cpu);
        let _model = FluxTransformer::new(&vs.root(), &cfg, Kind::Float).unwrap();
        let mut built: Vec<(String, Vec<i64>)> =
            vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        built.sort();
        assert_eq!(cfg.weight_shapes(), built, "{cfg:?}");
    }
}

const GIB: f64 = (1u64 << 30) as f64;

#[test]
fn the_reference_recipe_on_eight_ranks_holds_sharding_md_s_state_per_rank() {
    let cfg = FluxConfig::flux_dev();
    let layout = Layout::new(&cfg.weight_shapes(), 8).unwrap();
    let p = layout.elements() as f64;
    let shard = layout.shard_elements() as f64;
    let unit = layout.largest_unit() as f64;
    let rows = [
        ("f32 master shard", 4.0 * shard, 5.6),
        ("f32 gradient shard", 4.0 * shard, 5.6),
        ("AdamW moments", 8.0 * shard, 11.1),
        ("one unit's full gradient before its reduce-scatter (f32)", 4.0 * unit, 1.3),
        ("gathered units (current + prefetched, bf16)", 2.0 * 2.0 * unit, 1.3),
    ];
    println!("FLUX.1-dev, {} units, P = {:.3} B, N = 8, per rank:", layout.units.len(), p / 1e9);
    println!("| part | GiB (this layout) | GiB (SHARDING.md) |");
    for (part, bytes, table) in rows {
        println!("| {part} | {:.2} | {table} |", bytes / GIB);
        // The table rounds to 0.1 GiB (5.54 is listed as 5.6, half of 11.1).
        assert!(
            (bytes / GIB - table).abs() <= 0.1,
            "{part}: {:.3} GiB, table {table}",
            bytes / GIB
        );
    }
    // And the bf16 rollout replica of SHARDING.md's replica mode (2P), which the trainer holds
    // outside the update.
    println!("| bf16 rollout replica | {:.2} | 22.2 |", 2.0 * p / GIB);
    assert!((2.0 * p / GIB - 22.2).abs() <= 0.1);
    assert!((p / 1e9 - 11.90).abs() < 0.005, "P = {p}");
    assert_eq!(layout.units.len(), 1 + 19 + 38);
    assert_eq!(layout.units[0].name, "root");
    // Padding to a multiple of 8 costs at most 7 elements per unit.
    assert!(shard * 8.0 - p <= 7.0 * layout.units.len() as f64);
    // The largest unit is a double block: 339.7 M weights (MODELS.md §5: 6.457 B / 19).
    assert!((unit / 1e6 - 339.8).abs() < 0.5, "largest unit {unit}");
}
