//! Wire constants and the little-endian layouts of the header and discard segments.

use blk_proto::*;

#[test]
fn constants_match_the_virtio_spec() {
    assert_eq!((SECTOR_SHIFT, SECTOR_SIZE), (9, 512));
    assert_eq!(
        (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP),
        (0, 1, 2)
    );
    assert_eq!(
        (
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES
        ),
        (0, 1, 4, 8, 11, 13)
    );
    assert_eq!(VIRTIO_BLK_T_BARRIER, 0x8000_0000);
    assert_eq!(VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, 1);
    assert_eq!(VIRTIO_BLK_ID_BYTES, 20);
    assert_eq!((CONFIG_SPACE_SIZE, WCE_OFFSET), (60, 32));
}

#[test]
fn raw_range_is_16_little_endian_bytes() {
    let bytes = [
        1, 2, 3, 4, 5, 6, 7, 8, // sector
        9, 10, 11, 12, // num_sectors
        13, 14, 15, 16, // flags
    ];
    let range = RawRange::from_le_bytes(&bytes);
    assert_eq!(
        range,
        RawRange {
            sector: 0x0807_0605_0403_0201,
            num_sectors: 0x0c0b_0a09,
            flags: 0x100f_0e0d,
        }
    );
    assert_eq!(range.to_le_bytes(), bytes);
}

#[test]
fn request_header_is_16_little_endian_bytes() {
    let bytes = [
        0x0b, 0, 0, 0x80, // type: DISCARD | BARRIER
        1, 0, 0, 0, // ioprio
        0xff, 0, 0, 0, 0, 0, 0, 0x01, // sector
    ];
    let header = RequestHeader::from_le_bytes(&bytes);
    assert_eq!(
        header,
        RequestHeader {
            request_type: VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_BARRIER,
            ioprio: 1,
            sector: 0x0100_0000_0000_00ff,
        }
    );
    assert_eq!(header.to_le_bytes(), bytes);
}
