fn main() {
    let _ = aya::EbpfLoader::new();
}
