//! `lfmctl stats [--experts] [--json]`: the expert pager's figures from
//! `GetStatus`, and with `--experts` one row per MoE layer: a heat map of how
//! often tokens chose each expert next to a map of which experts are in
//! memory.

use lfm_proto::v1 as pb;
use serde_json::{Value, json};
use std::fmt::Write as _;

/// Shades from "never chosen" to "the layer's busiest expert".
const RAMP: &[u8] = b" .:-=+*#%@";
/// xterm-256 backgrounds for the same steps when colour is on.
const HEAT_BG: [u8; 10] = [236, 17, 18, 19, 20, 21, 57, 93, 129, 165];

/// The shade step (0..10) of `hits` against the layer's busiest expert:
/// 0 only for an expert never chosen, the top step only for the busiest.
fn step(hits: u64, max: u64) -> usize {
    if hits == 0 || max == 0 {
        return 0;
    }
    let top = RAMP.len() - 1;
    // 1..=top, proportional; rounding up keeps any use visible.
    (((hits as u128 * top as u128).div_ceil(max as u128)) as usize).clamp(1, top)
}

fn bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// The totals as text (`lfmctl stats`, and a line of `lfmctl status`).
pub fn summary(p: &pb::ExpertPaging) -> String {
    let budget = match p.budget_bytes {
        Some(b) => format!("{} allowed for the model", bytes(b)),
        None => "no limit".into(),
    };
    let cap = p
        .expert_cap_bytes
        .map_or_else(String::new, |c| format!(", experts up to {}", bytes(c)));
    let used = if p.predictions == 0 {
        String::new()
    } else {
        format!(
            " ({:.0}% then chosen)",
            100.0 * p.predictions_used as f64 / p.predictions as f64
        )
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "budget: {} ({budget}; {} of non-expert weights always in{cap})",
        p.budget_mode,
        bytes(p.fixed_bytes)
    );
    let _ = writeln!(
        s,
        "experts in memory: {} of {}, {} locked",
        bytes(p.expert_resident_bytes),
        bytes(p.expert_total_bytes),
        bytes(p.locked_bytes)
    );
    let rate = if p.load_seconds > 0.0 {
        format!(
            " in {:.1} s, {}/s",
            p.load_seconds,
            bytes((p.bytes_in as f64 / p.load_seconds) as u64)
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "paging: {} loads ({} read{rate}), {} evictions, {} predictions{used}",
        p.loads,
        bytes(p.bytes_in),
        p.evictions,
        p.predictions
    );
    let faults = p
        .major_faults
        .map_or_else(|| "unknown".into(), |f| f.to_string());
    let pressure = p
        .memory_pressure
        .map_or_else(|| "unknown (no PSI)".into(), |x| format!("{x:.1}%"));
    let _ = writeln!(
        s,
        "process: {faults} major page faults; memory pressure (10 s) {pressure}"
    );
    s
}

/// The per-layer maps. `colour` adds xterm-256 backgrounds to the heat map.
pub fn heat_map(p: &pb::ExpertPaging, colour: bool) -> String {
    let n = p.layers.iter().map(|l| l.experts.len()).max().unwrap_or(0);
    let mut s = String::new();
    if n == 0 {
        s.push_str("no per-expert figures (the daemon sent none)\n");
        return s;
    }
    // Expert numbers every 5 columns, over both maps.
    let mut ruler = vec![b' '; n];
    for i in (0..n).step_by(5) {
        let label = i.to_string();
        if i + label.len() <= n {
            ruler[i..i + label.len()].copy_from_slice(label.as_bytes());
        }
    }
    let ruler = String::from_utf8_lossy(&ruler);
    let _ = writeln!(s, "          {ruler}   {ruler}");
    let _ = writeln!(
        s,
        "layer     {:<n$}   {:<n$}   in     hits  loads  read in",
        "hits",
        "mem",
        n = n
    );
    for l in &p.layers {
        let max = l.experts.iter().map(|e| e.hits).max().unwrap_or(0);
        let mut heat = String::new();
        let mut res = String::new();
        for e in &l.experts {
            let k = step(e.hits, max);
            let c = RAMP[k] as char;
            if colour {
                let _ = write!(heat, "\x1b[48;5;{}m{c}\x1b[0m", HEAT_BG[k]);
            } else {
                heat.push(c);
            }
            res.push(if e.locked {
                'L'
            } else if e.resident {
                '#'
            } else {
                '.'
            });
        }
        // Pad short layers so the columns stay aligned.
        let pad = " ".repeat(n - l.experts.len());
        let resident = l.experts.iter().filter(|e| e.resident).count();
        let hits: u64 = l.experts.iter().map(|e| e.hits).sum();
        let loads: u64 = l.experts.iter().map(|e| e.loads).sum();
        let read: u64 = l.experts.iter().map(|e| e.bytes_in).sum();
        let _ = writeln!(
            s,
            "blk.{:<4}  {heat}{pad}   {res}{pad}   {:>2}/{:<2} {hits:>6} {loads:>6}  {}",
            l.layer,
            resident,
            l.experts.len(),
            bytes(read)
        );
    }
    s.push_str(
        "hits: ' ' never chosen, . : - = + * # % @ up to the layer's busiest expert\nmem: # in memory, L locked in memory, . not in memory\n",
    );
    s
}

/// The figures as JSON: totals, and `layers` when `experts`.
pub fn to_json(p: &pb::ExpertPaging, experts: bool) -> Value {
    let mut v = json!({
        "budget_mode": p.budget_mode,
        "budget_bytes": p.budget_bytes,
        "fixed_bytes": p.fixed_bytes,
        "expert_resident_bytes": p.expert_resident_bytes,
        "expert_cap_bytes": p.expert_cap_bytes,
        "expert_total_bytes": p.expert_total_bytes,
        "locked_bytes": p.locked_bytes,
        "loads": p.loads,
        "bytes_in": p.bytes_in,
        "load_seconds": p.load_seconds,
        "evictions": p.evictions,
        "predictions": p.predictions,
        "predictions_used": p.predictions_used,
        "major_faults": p.major_faults,
        "memory_pressure": p.memory_pressure,
    });
    if experts {
        v["layers"] = p
            .layers
            .iter()
            .map(|l| {
                json!({
                    "layer": l.layer,
                    "experts": l.experts.iter().enumerate().map(|(i, e)| json!({
                        "expert": i,
                        "hits": e.hits,
                        "resident": e.resident,
                        "locked": e.locked,
                        "loads": e.loads,
                        "bytes_in": e.bytes_in,
                        "evictions": e.evictions,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(hits: u64, resident: bool, locked: bool) -> pb::ExpertCounters {
        pb::ExpertCounters {
            hits,
            resident,
            locked,
            loads: 1,
            bytes_in: 1 << 20,
            evictions: 0,
        }
    }

    fn sample() -> pb::ExpertPaging {
        pb::ExpertPaging {
            budget_mode: "fixed".into(),
            budget_bytes: Some(3 << 30),
            expert_total_bytes: 4 << 30,
            expert_resident_bytes: 1 << 30,
            predictions: 4,
            predictions_used: 3,
            layers: vec![
                pb::ExpertLayer {
                    layer: 2,
                    experts: vec![
                        counters(0, false, false),
                        counters(1, true, false),
                        counters(50, true, false),
                        counters(100, true, true),
                    ],
                },
                pb::ExpertLayer {
                    layer: 3,
                    experts: vec![counters(0, false, false); 4],
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn shades_run_from_unused_to_busiest() {
        assert_eq!(step(0, 100), 0);
        assert_eq!(step(1, 100), 1, "any use is visible");
        assert_eq!(step(50, 100), 5);
        assert_eq!(step(100, 100), RAMP.len() - 1);
        assert_eq!(step(0, 0), 0);
    }

    #[test]
    fn the_map_has_a_row_per_layer_with_heat_and_residency() {
        let m = heat_map(&sample(), false);
        let rows: Vec<&str> = m.lines().filter(|l| l.starts_with("blk.")).collect();
        assert_eq!(rows.len(), 2, "{m}");
        assert!(rows[0].contains(" .+@   .##L "), "{}", rows[0]);
        assert!(rows[0].contains(" 3/4 "), "{}", rows[0]);
        assert!(rows[0].contains("   151 "), "hits summed: {}", rows[0]);
        assert!(rows[1].contains("       ....   "), "{}", rows[1]);
        assert!(m.lines().next().unwrap().trim_start().starts_with('0'));
        let coloured = heat_map(&sample(), true);
        assert!(coloured.contains("\x1b[48;5;165m@\x1b[0m"), "{coloured}");
    }

    #[test]
    fn summary_and_json_carry_the_totals() {
        let p = sample();
        let s = summary(&p);
        assert!(s.contains("budget: fixed (3.00 GiB allowed"), "{s}");
        assert!(s.contains("1.00 GiB of 4.00 GiB"), "{s}");
        assert!(s.contains("(75% then chosen)"), "{s}");
        let j = to_json(&p, true);
        assert_eq!(j["budget_bytes"], 3u64 << 30);
        assert_eq!(j["layers"][0]["experts"][3]["locked"], true);
        assert_eq!(j["layers"][1]["layer"], 3);
        assert!(to_json(&p, false).get("layers").is_none());
    }
}
