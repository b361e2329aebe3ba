//! Every fuzz target survives its seed corpus (which holds past crashes as regressions) and a few
//! thousand mutated inputs; the seeds still parse, so the corpus follows the current formats.

use std::path::Path;

use tq_fuzz::{Budget, TARGETS};

fn corpus_dir(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/fuzz")
        .join(target)
}

#[test]
fn every_target_survives_its_corpus_and_mutations() {
    let crash_dir = std::env::temp_dir().join(format!("tq-fuzz-smoke-{}", std::process::id()));
    for t in TARGETS {
        let seeds = tq_fuzz::read_corpus(&corpus_dir(t.name)).unwrap();
        assert!(!seeds.is_empty(), "{}: no seed corpus", t.name);
        let s = tq_fuzz::fuzz(t, &seeds, Budget::Runs(1500), 7, &crash_dir).unwrap();
        assert!(
            s.crashes.is_empty(),
            "{}: {} crashing inputs, e.g. {}",
            t.name,
            s.crashes.len(),
            s.crashes[0].display()
        );
        assert_eq!(s.executions, seeds.len() as u64 + 1500);
    }
    let _ = std::fs::remove_dir_all(&crash_dir);
}

/// Every generated seed is committed and parses the same way from disk (safetensors headers
/// hold a JSON map whose key order varies between writes, so bytes are compared through the
/// parser, not directly).
#[test]
fn the_committed_seeds_are_the_generated_ones_and_parse() {
    for t in TARGETS {
        let generated = tq_fuzz::corpus::seeds(t.name).unwrap();
        assert!(!generated.is_empty(), "{}", t.name);
        for (name, bytes) in generated {
            let on_disk = std::fs::read(corpus_dir(t.name).join(&name))
                .unwrap_or_else(|e| panic!("{}/{name}: {e} (run tq-fuzz --write-corpus)", t.name));
            // The one seed that must be refused: an encoder-decoder config.
            let want = !name.starts_with("encoder-decoder");
            assert_eq!((t.run)(&bytes), want, "{}/{name}", t.name);
            assert_eq!((t.run)(&on_disk), want, "{}/{name} on disk", t.name);
        }
    }
}

#[test]
fn a_panicking_target_is_caught_and_its_input_saved() {
    let boom = tq_fuzz::Target {
        name: "boom",
        about: "panics on inputs starting with 0xFF",
        run: |d| {
            assert!(d.first() != Some(&0xFF), "boom");
            true
        },
    };
    let dir = std::env::temp_dir().join(format!("tq-fuzz-boom-{}", std::process::id()));
    let s = tq_fuzz::fuzz(&boom, &[vec![0xFF, 1], vec![0]], Budget::Runs(0), 1, &dir).unwrap();
    assert_eq!(s.crashes.len(), 1);
    assert_eq!(std::fs::read(&s.crashes[0]).unwrap(), vec![0xFF, 1]);
    std::fs::remove_dir_all(&dir).unwrap();
}
