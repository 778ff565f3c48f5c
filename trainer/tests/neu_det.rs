//! The VOC loader over the real NEU-DET pool (1,440 images). The pool's path comes from
//! `NEU_DET_DIR` (set by `.ci/run` to `../shared/datasets/neu-det`).

use trainer::data::{self, voc};

#[test]
fn loads_every_real_neu_det_file() {
    let Some(dir) = std::env::var_os("NEU_DET_DIR") else {
        eprintln!("NEU_DET_DIR is not set: the real NEU-DET check did not run (CI sets it)");
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    assert!(
        dir.join("images").is_dir(),
        "NEU_DET_DIR={} has no images/ folder",
        dir.display()
    );
    let classes: Vec<String> = edge_detector::NEU_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let dataset = voc::load(&dir, &classes).expect("NEU-DET loads");
    assert_eq!(dataset.samples.len(), 1440);
    assert!(
        dataset.warnings.is_empty(),
        "{:?}",
        &dataset.warnings[..dataset.warnings.len().min(5)]
    );
    let objects: usize = dataset.samples.iter().map(|s| s.objects.len()).sum();
    assert_eq!(objects, 3353);
    assert_eq!(
        dataset
            .samples
            .iter()
            .flat_map(|s| &s.objects)
            .filter(|o| o.difficult)
            .count(),
        66
    );
    for s in &dataset.samples {
        assert_eq!((s.width, s.height), (200, 200), "{}", s.stem);
        assert!((1..=9).contains(&s.objects.len()), "{}", s.stem);
        // Each NEU image shows the defect class named in its file name (not in <filename>);
        // some also have boxes of other classes (inclusions on patches, scratches...).
        let class = s
            .name_class(&classes)
            .expect("NEU file name carries the class");
        assert!(s.objects.iter().any(|o| o.class_id == class), "{}", s.stem);
    }
    let mixed = dataset
        .samples
        .iter()
        .filter(|s| {
            s.objects
                .iter()
                .any(|o| Some(o.class_id) != s.name_class(&classes))
        })
        .count();
    assert!(
        mixed > 0 && mixed < 200,
        "{mixed} images with boxes of a second class"
    );
    let (train, val) = data::split(&dataset, 0.2, 42);
    assert_eq!((train.len(), val.len()), (1152, 288));
}
