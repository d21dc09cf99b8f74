mod common;
use common::*;

#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let img = dir.path().join("d.img");
    let _d = Daemon::start(
        &sock,
        &[
            "--disk",
            img.to_str().unwrap(),
            "--size",
            "64M",
            "--num-queues",
            "2",
        ],
    );
    let mut c = Client::connect(&sock, 2).unwrap();
    assert_eq!(c.capacity(), 64 << 20);
    fill_pattern(c.buf(0, 65536), 1, 4096);
    assert_eq!(c.write(0, 4096, 0, 65536), 0);
    assert_eq!(c.read(1, 4096, 1 << 20, 65536), 0);
    let (a, b) = (c.buf(0, 65536).to_vec(), c.buf(1 << 20, 65536).to_vec());
    assert!(a == b);
    assert_eq!(c.flush(0), 0);
}
