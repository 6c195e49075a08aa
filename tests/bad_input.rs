//! Bad input never panics: every case exits non-zero with a one-line error that says
//! what is wrong, and a failed conversion leaves no output file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, demo_model};
use dynsparse::{Model, TensorData};

struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("dynsparse-bad-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the CLI, expects failure with one `error:` line containing `needle`.
fn fails(args: &[&str], needle: &str) {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run dynsparse");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {stderr}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {stderr}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: '{}' does not mention '{needle}'",
        lines[0]
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sample_png() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/samples/canvas_1_3.png")
}

#[test]
fn bad_model_files() {
    let t = Tmp::new("model");
    let img = sample_png();
    let infer =
        |model: &Path, needle: &str| fails(&["infer", "--model", s(model), s(&img)], needle);
    infer(&t.0.join("nope.dsm"), "No such file");
    infer(&t.file("empty.dsm", b""), "invalid model file");
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    infer(&t.file("noise.dsm", &noise), "invalid model file");
    let good = std::fs::read(demo_model()).unwrap();
    infer(
        &t.file("cut.dsm", &good[..good.len() / 2]),
        "invalid model file",
    );

    let model = Model::load(demo_model()).unwrap();
    let mut missing = model.clone();
    missing.weights.remove("layer2.0.conv1.weight");
    infer(
        &t.file("missing.dsm", &missing.to_bytes().unwrap()),
        "missing tensor 'layer2.0.conv1.weight'",
    );
    let mut misshaped = model.clone();
    misshaped.weights.insert(
        "fc.bias".into(),
        TensorData::new(vec![7], vec![0.0; 7]).unwrap(),
    );
    infer(
        &t.file("misshaped.dsm", &misshaped.to_bytes().unwrap()),
        "'fc.bias' has shape [7], expected [10]",
    );
    // A plain safetensors file without our metadata.
    let plain =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/demo.safetensors"))
            .unwrap();
    infer(
        &t.file("plain.safetensors", &plain),
        "without dynsparse metadata",
    );
}

#[test]
fn bad_images_and_tensors() {
    let t = Tmp::new("input");
    let model = demo_model();
    let m = s(&model);
    fails(
        &["infer", "--model", m, s(&t.0.join("nope.png"))],
        "No such file",
    );
    fails(
        &["infer", "--model", m, s(&t.file("empty.png", b""))],
        "empty",
    );
    fails(
        &[
            "infer",
            "--model",
            m,
            s(&t.file("text.png", b"hello, I am not an image")),
        ],
        "cannot decode image",
    );
    let png = std::fs::read(sample_png()).unwrap();
    fails(
        &[
            "infer",
            "--model",
            m,
            s(&t.file("cut.png", &png[..png.len() / 2])),
        ],
        "cannot decode image",
    );

    let npy = |name: &str, shape: Vec<usize>, fill: f32| {
        let n = shape.iter().product();
        let bytes = dynsparse::npy::to_bytes(&TensorData::new(shape, vec![fill; n]).unwrap());
        t.file(name, &bytes)
    };
    fails(
        &[
            "infer",
            "--model",
            m,
            "--tensor",
            s(&npy("shape.npy", vec![1, 3, 28, 28], 0.5)),
        ],
        "does not match",
    );
    fails(
        &[
            "infer",
            "--model",
            m,
            "--tensor",
            s(&npy("rank.npy", vec![3, 64, 64], 0.5)),
        ],
        "does not match",
    );
    fails(
        &[
            "infer",
            "--model",
            m,
            "--tensor",
            s(&npy("nan.npy", vec![2, 3, 64, 64], f32::NAN)),
        ],
        "non-finite",
    );
    fails(
        &[
            "infer",
            "--model",
            m,
            "--tensor",
            s(&t.file("junk.npy", b"\x93NUMPY junk")),
        ],
        ".npy",
    );
}

#[test]
fn bad_conversions_leave_no_file() {
    let t = Tmp::new("convert");
    let ckpt = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/demo.safetensors");
    let out = t.0.join("out.dsm");
    let convert = |arch: &str, input: &Path, needle: &str| {
        fails(
            &[
                "convert",
                "--arch",
                arch,
                "--input",
                s(input),
                "--output",
                s(&out),
            ],
            needle,
        );
        assert!(!out.exists(), "failed conversion left {}", out.display());
    };
    convert("resnet56", &ckpt, "missing: layer1.3.conv1.weight");
    convert(
        "mobilenet_v2",
        &ckpt,
        "does not match architecture 'mobilenet_v2'",
    );
    convert("resnet20", &t.0.join("nope.pth"), "No such file");
    convert(
        "resnet20",
        &t.file("empty.pth", b""),
        "not a PyTorch checkpoint",
    );
    convert(
        "resnet20",
        &t.file("noise.pth", &[7u8; 1000]),
        "not a PyTorch checkpoint",
    );
    let bytes = std::fs::read(&ckpt).unwrap();
    convert(
        "resnet20",
        &t.file("cut.safetensors", &bytes[..bytes.len() - 100]),
        "cannot read checkpoint",
    );
    convert(
        "resnet20",
        &t.file("cut.pth", b"PK\x03\x04 and then nothing"),
        "cannot read checkpoint",
    );

    convert(
        "resnet9000",
        &ckpt,
        "unknown architecture 'resnet9000' (known: resnet18, resnet34",
    );
}

/// The mismatch report lists every problem at once: missing, mis-shaped and unexpected.
#[test]
fn mismatch_report_is_complete() {
    use dynsparse::convert::{checkpoint, convert_tensors};
    let ckpt_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/demo.safetensors");
    let mut ckpt = checkpoint::read(&ckpt_path).unwrap();
    ckpt.remove("layer1.0.bn1.running_var");
    ckpt.insert(
        "layer3.2.conv2.weight".into(),
        TensorData::new(vec![1], vec![0.0]).unwrap(),
    );
    ckpt.insert(
        "extra.weight".into(),
        TensorData::new(vec![1], vec![0.0]).unwrap(),
    );
    let err = convert_tensors("resnet20", &ckpt, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 missing: layer1.0.bn1.running_var"), "{err}");
    assert!(
        err.contains("1 mis-shaped: layer3.2.conv2.weight is [1], expected [64, 64, 3, 3]"),
        "{err}"
    );
    assert!(err.contains("1 unexpected: extra.weight"), "{err}");
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error_and_auto_falls_back() {
    use dynsparse::exec::cuda;
    use dynsparse::{demo, DeviceChoice, Options, Runtime};
    if cuda::device_count() > 0 {
        eprintln!("skipped: this machine has a CUDA GPU");
        return;
    }
    let cuda_only = Options {
        device: DeviceChoice::Cuda,
        ..Options::default()
    };
    match Runtime::from_bytes(demo::MODEL, cuda_only) {
        Err(dynsparse::Error::Cuda(msg)) => assert!(msg.contains("--device cpu"), "{msg}"),
        Err(e) => panic!("expected a CUDA error, got {e}"),
        Ok(_) => panic!("--device cuda succeeded without a GPU"),
    }
    let auto = Runtime::from_bytes(demo::MODEL, Options::default()).unwrap();
    assert!(auto.device_note().unwrap().contains("CPU"));
    let cpu = Runtime::from_bytes(
        demo::MODEL,
        Options {
            device: DeviceChoice::Cpu,
            ..Options::default()
        },
    )
    .unwrap();
    assert_eq!(cpu.device_note(), None);
    fails(
        &[
            "infer",
            "--device",
            "cuda",
            "--model",
            s(&demo_model()),
            s(&sample_png()),
        ],
        "no CUDA driver",
    );
    // Auto runs on the CPU and says so.
    let out = Command::new(bin())
        .args(["infer", "--model", s(&demo_model()), s(&sample_png())])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("running on the CPU"));
}

/// Every command that plots refuses a file name that is neither .svg nor .png before it
/// runs anything, in one line that names the file (upper-case extensions are accepted).
#[test]
fn plots_take_svg_or_png_and_say_so_before_running() {
    let model = demo_model();
    let m = s(&model);
    let want = "x.gif: plots are written as SVG (.svg) or PNG (.png)";
    fails(&["demo", "--plot", "x.gif"], want);
    fails(&["profile", "--quick", "--plot", "x.gif"], want);
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/samples");
    for opt in ["--plot", "--layer-plot", "--quality-plot"] {
        fails(
            &["bench", "--model", m, "--images", s(&samples), opt, "x.gif"],
            want,
        );
    }
    fails(
        &["bench", "--model", m, "--plot", "noextension"],
        "noextension: plots",
    );
    let t = Tmp::new("plots");
    let out = Command::new(bin())
        .args(["profile", "--quick", "--runs", "1", "--out"])
        .arg(t.0.join("p.json"))
        .arg("--plot")
        .arg(t.0.join("P.SVG"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(t.0.join("P.SVG")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("kept output channels"));
}

/// Output into a pipe nobody reads any more (`dynsparse … | head`) ends the program
/// quietly, by SIGPIPE, instead of a panic in `println!`.
#[cfg(unix)]
#[test]
fn closed_stdout_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin())
        .args(["info", "--model", s(&demo_model())])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.signal(), Some(13), "{:?}: {err}", out.status);
}
