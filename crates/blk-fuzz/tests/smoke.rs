use proptest::prelude::*;
proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
    #[test]
    fn drain(data in prop::collection::vec(any::<u8>(), 0..2048)) { blk_fuzz::check_drain(&data); }
    #[test]
    fn chain(data in prop::collection::vec(any::<u8>(), 0..1024)) { blk_fuzz::check_chain(&data); }
}
