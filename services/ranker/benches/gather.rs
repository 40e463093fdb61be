//! `gather`: a Score call's matrix into the model's inputs (column lookup by
//! name, reordering, the finiteness and bucket checks), for 1, 100 and 1000
//! rows of the feature-service's columns on the committed DCN-v2 manifest
//! (29 dense features and 7 categorical ids), next to its floor: copying the
//! matrix's two blocks as they are, which any gather does at least. Run with
//! `cargo bench -p adserve-ranker --bench gather`.

use adserve_ranker::model::{ModelManifest, gather};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn manifest() -> ModelManifest {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/ctr-dcnv2-typed/manifest.json");
    adserve_registry::read_manifest(std::path::Path::new(path)).expect("the committed DCN-v2 manifest reads")
}

fn bench(c: &mut Criterion) {
    let manifest = manifest();
    let registry = adserve_features::registry();
    let mut group = c.benchmark_group("gather");
    for rows in [1usize, 100, 1000] {
        let m = registry.sample_matrix(rows);
        let input = gather(&m, &manifest).expect("the sample matrix feeds the DCN-v2");
        assert_eq!(input.rows, rows);
        group.bench_with_input(BenchmarkId::new("gather", rows), &m, |b, m| {
            b.iter(|| gather(std::hint::black_box(m), &manifest).expect("valid"))
        });
        group.bench_with_input(BenchmarkId::new("copy_blocks", rows), &m, |b, m| {
            b.iter(|| {
                let m = std::hint::black_box(m);
                (m.values.to_vec(), m.categorical_ids.to_vec())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
