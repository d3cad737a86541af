//! Runs inside the dm-thin QEMU guest for `bench dmthin` (`thinpipe_guest`): a fresh pool,
//! the sample family prepared, then activations through the pipeline beside the floor (a
//! thin snapshot and its activation by ioctl plus one durable redb commit), interleaved. Under
//! TCG every figure is slow; only the ratio means anything. Prints `THINPIPE-GUEST bench
//! <line>` markers; built without fault points (this crate never enables them).

use std::path::Path;
use std::time::{Duration, Instant};

use thinpipe::fsm::Outcome;
use thinpipe::image::write_sample_family;
use thinpipe::volume::VolumeId;
use thinpipe::volume::dmthin::{SNAP_THIN_ID_BASE, thin_id};
use thinpipe_guest::inside::{Host, STATE, VOLUME_BYTES, check, host, marker, mount_state, prepare, setup_pool};

const N: usize = 40;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn bench(h: &Host) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let base = match prepare(h, "web").await? {
        Outcome::Completed(w) => w.base_vol_id.ok_or("prepare completed without a base")?,
        Outcome::Failed(f) => return Err(format!("prepare failed: {f}")),
    };
    let db = redb::Database::create(Path::new(STATE).join("floor.redb")).map_err(|x| e(&x))?;
    const T: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("t");
    let pool = h.backend.pool();
    let origin = thin_id(VolumeId::Base(base)).map_err(|x| e(&x))?;
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for n in 0..N {
        let started = Instant::now();
        match h.pipeline.activate("web", &format!("bench-{n}"), base, None).await.map_err(|x| e(&x))? {
            Outcome::Completed(_) => ours.push(started.elapsed()),
            Outcome::Failed(f) => return Err(format!("bench activation {n} failed: {f}")),
        }
        let tid = SNAP_THIN_ID_BASE + 100_000 + n as u64;
        let started = Instant::now();
        pool.message(&format!("create_snap {tid} {origin}")).map_err(|x| e(&x))?;
        pool.activate(&format!("floor-{n}"), &format!("FLOOR-{tid}"), tid, VOLUME_BYTES / 512).map_err(|x| e(&x))?;
        let mut txn = db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(redb::Durability::Immediate).map_err(|x| e(&x))?;
        txn.open_table(T).map_err(|x| e(&x))?.insert(n as u64, n as u64).map_err(|x| e(&x))?;
        txn.commit().map_err(|x| e(&x))?;
        floor.push(started.elapsed());
    }
    ours.sort();
    floor.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    marker(&format!(
        "bench activate_ours_dmthin_emulated p50 {:.1} ms p99 {:.1} ms ({N} activations, QEMU TCG)",
        ms(percentile(&ours, 0.5)),
        ms(percentile(&ours, 0.99))
    ));
    marker(&format!(
        "bench activate_floor_dmthin_emulated p50 {:.1} ms p99 {:.1} ms (create_snap + activate by ioctl + one durable redb commit)",
        ms(percentile(&floor, 0.5)),
        ms(percentile(&floor, 0.99))
    ));
    marker(&format!(
        "bench activate_dmthin_emulated ratio_vs_floor={:.2}",
        ms(percentile(&ours, 0.5)) / ms(percentile(&floor, 0.5))
    ));
    Ok(())
}

fn main() {
    let phase = std::env::args().nth(1).unwrap_or_default();
    let Some(rt) = thinpipe_guest::inside::runtime() else { return };
    if phase == "bench"
        && check("pool", || setup_pool(true).map(drop))
        && check("state disk", || mount_state(true))
        && check("sample family", || {
            write_sample_family(&Path::new(STATE).join("images"), "web").map(drop).map_err(|e| e.to_string())
        })
    {
        check("bench", || {
            rt.block_on(async {
                let h = host().await?;
                let r = bench(&h).await;
                h.engine.shutdown().await;
                r
            })
        });
    } else if phase != "bench" {
        marker(&format!("fail phase: unknown phase {phase:?}"));
    }
    // The guest powers off next; its disks are temporary files on the host.
    marker(&format!("done {phase}"));
}
