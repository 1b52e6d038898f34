//! One test (at least) per parsing rule, over a mock split queue in real mmap'd guest memory.

mod common;

use blk_proto::{
    DeviceConfig, ParseError, Range, RawRange, Request, RequestKind, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_BARRIER, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use common::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const CAPACITY_SECTORS: u64 = CAPACITY_BYTES / 512;

/// header at HDR, `data` in between, status byte at STATUS.
fn chain_with(data: &[D]) -> Vec<D> {
    let mut descs = vec![r(HDR, 16)];
    descs.extend_from_slice(data);
    descs.push(w(STATUS, 1));
    descs
}

/// Asserts a request error: the status byte was located and the expected status returned.
fn assert_request_error(
    result: Result<(), ParseError>,
    expected: ParseError,
    status: u8,
    req: &Request,
    mem: &Mem,
) {
    assert_eq!(result, Err(expected.clone()));
    assert_eq!(expected.status(), Some(status));
    assert_eq!(req.status, host(mem, STATUS), "status byte not located");
}

fn assert_chain_error(result: Result<(), ParseError>, expected: ParseError) {
    assert_eq!(result, Err(expected.clone()));
    assert_eq!(expected.status(), None);
}

fn put_ranges(mem: &Mem, addr: u64, ranges: &[RawRange]) -> u32 {
    for (i, range) in ranges.iter().enumerate() {
        mem.write_slice(&range.to_le_bytes(), GuestAddress(addr + 16 * i as u64))
            .unwrap();
    }
    16 * ranges.len() as u32
}

fn range(sector: u64, num_sectors: u32, flags: u32) -> RawRange {
    RawRange {
        sector,
        num_sectors,
        flags,
    }
}

// ---------------------------------------------------------------- OK paths, every type

#[test]
fn read_iovecs_point_at_the_guest_buffers() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 8);
    let mut req = request();
    let descs = chain_with(&[w(DATA, 4096), w(DATA + 0x2000, 512)]);
    parse_descs(&mem, &config(), &descs, &mut req).unwrap();

    assert_eq!(req.kind, RequestKind::Read);
    assert_eq!(req.sector, 8);
    assert_eq!(req.data_len, 4608);
    assert_eq!(req.iovecs.len(), 2);
    assert_eq!(req.iovecs[0].iov_base as *mut u8, host(&mem, DATA));
    assert_eq!(req.iovecs[0].iov_len, 4096);
    assert_eq!(req.iovecs[1].iov_base as *mut u8, host(&mem, DATA + 0x2000));
    assert_eq!(req.status, host(&mem, STATUS));
    assert_eq!(req.used_len, 4609);

    // What an executor writes through the iovecs lands in the guest's buffers.
    let data: Vec<u8> = (0..4608u32).map(|i| (i % 251) as u8).collect();
    scatter(&req, &data);
    assert_eq!(read_guest(&mem, DATA, 4096), data[..4096]);
    assert_eq!(read_guest(&mem, DATA + 0x2000, 512), data[4096..]);
}

#[test]
fn write_iovecs_expose_the_guest_data() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 16);
    let first = fill(&mem, DATA, 1024, 1);
    let second = fill(&mem, DATA + 0x4000, 3072, 2);
    let mut req = request();
    let descs = chain_with(&[r(DATA, 1024), r(DATA + 0x4000, 3072)]);
    parse_descs(&mem, &config(), &descs, &mut req).unwrap();

    assert_eq!(req.kind, RequestKind::Write);
    assert_eq!(req.sector, 16);
    assert_eq!(req.data_len, 4096);
    assert_eq!(req.iovecs.len(), 2);
    assert_eq!(req.used_len, 1);
    assert_eq!(req.status, host(&mem, STATUS));
    assert_eq!(gather(&req), [first, second].concat());
}

#[test]
fn flush_ignores_sector_and_data() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, u64::MAX);
    let mut req = request();
    parse_descs(&mem, &config(), &chain_with(&[]), &mut req).unwrap();
    assert_eq!(req.kind, RequestKind::Flush);
    assert!(req.iovecs.is_empty());
    assert_eq!(req.status, host(&mem, STATUS));
    assert_eq!(req.used_len, 1);
}

#[test]
fn get_id_accepts_any_length_and_keeps_at_most_20_bytes() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    for (buffers, expected_iovecs) in [
        (vec![], vec![]),
        (vec![w(DATA, 8)], vec![8]),
        (vec![w(DATA, 20)], vec![20]),
        (vec![w(DATA, 64)], vec![20]),
        (vec![w(DATA, 10), w(DATA + 0x100, 30)], vec![10, 10]),
        (vec![w(DATA, 20), w(DATA + 0x100, 30)], vec![20]),
    ] {
        let mut req = request();
        let writable: u32 = buffers.iter().map(|d| d.len).sum();
        parse_descs(&mem, &config(), &chain_with(&buffers), &mut req).unwrap();
        assert_eq!(req.kind, RequestKind::GetId);
        let lens: Vec<usize> = req.iovecs.iter().map(|iov| iov.iov_len).collect();
        assert_eq!(lens, expected_iovecs, "buffers {buffers:?}");
        assert_eq!(req.data_len as usize, expected_iovecs.iter().sum::<usize>());
        assert_eq!(req.used_len, writable + 1);
        if let Some(first) = buffers.first() {
            assert_eq!(req.iovecs[0].iov_base as *mut u8, host(&mem, first.addr));
        }
    }
}

#[test]
fn discard_yields_its_range() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let len = put_ranges(&mem, DATA, &[range(64, 128, 0)]);
    let mut req = request();
    parse_descs(&mem, &config(), &chain_with(&[r(DATA, len)]), &mut req).unwrap();
    assert_eq!(req.kind, RequestKind::Discard);
    assert_eq!(
        req.ranges,
        [Range {
            sector: 64,
            num_sectors: 128,
            unmap: false
        }]
    );
    assert_eq!(req.status, host(&mem, STATUS));
}

#[test]
fn write_zeroes_keeps_the_unmap_flag() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let mut cfg = config();
    cfg.max_write_zeroes_seg = 3;
    let len = put_ranges(
        &mem,
        DATA,
        &[
            range(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            range(100, 1, 0),
            range(CAPACITY_SECTORS - 65536, 65536, 0),
        ],
    );
    let mut req = Request::for_config(&cfg);
    parse_descs(&mem, &cfg, &chain_with(&[r(DATA, len)]), &mut req).unwrap();
    assert_eq!(req.kind, RequestKind::WriteZeroes);
    assert_eq!(
        req.ranges,
        [
            Range {
                sector: 0,
                num_sectors: 8,
                unmap: true
            },
            Range {
                sector: 100,
                num_sectors: 1,
                unmap: false
            },
            Range {
                sector: CAPACITY_SECTORS - 65536,
                num_sectors: 65536,
                unmap: false
            },
        ]
    );
}

#[test]
fn discard_payload_may_be_split_across_descriptors() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    put_ranges(&mem, DATA, &[range(24, 8, 0)]);
    let mut req = request();
    let descs = chain_with(&[r(DATA, 5), r(DATA + 5, 11)]);
    parse_descs(&mem, &config(), &descs, &mut req).unwrap();
    assert_eq!(
        req.ranges,
        [Range {
            sector: 24,
            num_sectors: 8,
            unmap: false
        }]
    );
}

#[test]
fn barrier_bit_is_ignored() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_BARRIER, 0);
    let mut req = request();
    parse_descs(&mem, &config(), &chain_with(&[w(DATA, 512)]), &mut req).unwrap();
    assert_eq!(req.kind, RequestKind::Read);
}

// ---------------------------------------------------------------- layouts

#[test]
fn header_split_across_descriptors() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0x0102_0304_0506_0708 & 0xffff);
    // Copy the header bytes to three scattered places: 3 + 5 + 8 bytes.
    let bytes = read_guest(&mem, HDR, 16);
    mem.write_slice(&bytes[..3], GuestAddress(HDR + 0x101))
        .unwrap();
    mem.write_slice(&bytes[3..8], GuestAddress(HDR + 0x203))
        .unwrap();
    mem.write_slice(&bytes[8..], GuestAddress(HDR + 0x305))
        .unwrap();
    let descs = [
        r(HDR + 0x101, 3),
        r(HDR + 0x203, 5),
        r(HDR + 0x305, 8),
        w(DATA, 512),
        w(STATUS, 1),
    ];
    let mut req = request();
    parse_descs(&mem, &config(), &descs, &mut req).unwrap();
    assert_eq!(req.kind, RequestKind::Read);
    assert_eq!(req.sector, 0x0708);
    assert_eq!(req.data_len, 512);
}

#[test]
fn header_and_write_data_share_a_descriptor() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 2);
    let data = fill(&mem, HDR + 16, 512, 7);
    let mut req = request();
    parse_descs(&mem, &config(), &[r(HDR, 16 + 512), w(STATUS, 1)], &mut req).unwrap();
    assert_eq!(req.kind, RequestKind::Write);
    assert_eq!(req.iovecs.len(), 1);
    assert_eq!(req.iovecs[0].iov_base as *mut u8, host(&mem, HDR + 16));
    assert_eq!(gather(&req), data);
}

#[test]
fn read_data_and_status_share_a_descriptor() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut req = request();
    parse_descs(&mem, &config(), &[r(HDR, 16), w(DATA, 513)], &mut req).unwrap();
    assert_eq!(req.data_len, 512);
    assert_eq!(req.iovecs.len(), 1);
    assert_eq!(req.iovecs[0].iov_len, 512);
    assert_eq!(req.status, host(&mem, DATA + 512));
    assert_eq!(req.used_len, 513);
}

#[test]
fn buffers_at_odd_addresses_and_lengths_with_aligned_total() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let buffers = [
        w(DATA + 1, 100),
        w(DATA + 0x1003, 300),
        w(DATA + 0x2007, 112),
    ];
    let mut req = request();
    parse_descs(&mem, &config(), &chain_with(&buffers), &mut req).unwrap();
    assert_eq!(req.data_len, 512);
    for (iov, buffer) in req.iovecs.iter().zip(&buffers) {
        assert_eq!(iov.iov_base as *mut u8, host(&mem, buffer.addr));
        assert_eq!(iov.iov_len, buffer.len as usize);
    }
    let data: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    scatter(&req, &data);
    assert_eq!(read_guest(&mem, DATA + 1, 100), data[..100]);
    assert_eq!(read_guest(&mem, DATA + 0x1003, 300), data[100..400]);
    assert_eq!(read_guest(&mem, DATA + 0x2007, 112), data[400..]);
}

#[test]
fn a_header_at_an_unaligned_address_is_read_whole() {
    let mem = guest();
    for offset in [1u64, 3, 4, 7] {
        put_header(
            &mem,
            HDR + offset,
            VIRTIO_BLK_T_IN,
            0x0102_0304_0506_0708 & 0xfff8,
        );
        let mut req = request();
        let descs = [r(HDR + offset, 16), w(DATA, 512), w(STATUS, 1)];
        parse_descs(&mem, &config(), &descs, &mut req).unwrap();
        assert_eq!(req.kind, RequestKind::Read);
        assert_eq!(req.sector, 0x0102_0304_0506_0708 & 0xfff8);
    }
}

#[test]
fn buffer_crossing_two_memory_regions_becomes_two_iovecs() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let start = REGION_SPLIT - 512;
    let data = fill(&mem, start, 1024, 3);
    let mut req = request();
    parse_descs(&mem, &config(), &chain_with(&[r(start, 1024)]), &mut req).unwrap();
    assert_eq!(req.iovecs.len(), 2);
    assert_eq!(req.iovecs[0].iov_base as *mut u8, host(&mem, start));
    assert_eq!(req.iovecs[0].iov_len, 512);
    assert_eq!(req.iovecs[1].iov_base as *mut u8, host(&mem, REGION_SPLIT));
    assert_eq!(req.iovecs[1].iov_len, 512);
    assert_eq!(gather(&req), data);
}

#[test]
fn zero_length_descriptors_are_skipped() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let descs = [
        r(HDR, 16),
        r(0xdead_0000_0000, 0),
        w(DATA, 0),
        w(DATA, 512),
        w(STATUS, 1),
        // A trailing empty writable descriptor does not move the status byte.
        w(MEM_END + 0x1000, 0),
    ];
    let mut req = request();
    parse_descs(&mem, &config(), &descs, &mut req).unwrap();
    assert_eq!(req.iovecs.len(), 1);
    assert_eq!(req.data_len, 512);
    assert_eq!(req.status, host(&mem, STATUS));
    assert_eq!(req.used_len, 513);
}

#[test]
fn indirect_table_is_followed() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 4);
    let head = indirect_table(&mem, INDIRECT, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]);
    let mut req = request();
    parse_raw_table(&mem, &config(), &[head], &mut req).unwrap();
    assert_eq!(req.kind, RequestKind::Read);
    assert_eq!(req.sector, 4);
    assert_eq!(req.data_len, 1024);
    assert_eq!(req.status, host(&mem, STATUS));
}

#[test]
fn request_is_reused_without_reallocating() {
    let mem = guest();
    let mut req = Request::with_capacity(8, 2);
    let iovecs_ptr = req.iovecs.as_ptr();
    let ranges_ptr = req.ranges.as_ptr();

    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let eight: Vec<D> = (0..8).map(|i| w(DATA + 0x1000 * i, 512)).collect();
    parse_descs(&mem, &config(), &chain_with(&eight), &mut req).unwrap();
    assert_eq!(req.iovecs.len(), 8);

    // Nine buffers do not fit: an error, not a reallocation.
    let nine: Vec<D> = (0..9).map(|i| w(DATA + 0x1000 * i, 512)).collect();
    let result = parse_descs(&mem, &config(), &chain_with(&nine), &mut req);
    assert_request_error(
        result,
        ParseError::TooManySegments { max: 8 },
        VIRTIO_BLK_S_IOERR,
        &req,
        &mem,
    );

    let mut cfg = config();
    cfg.max_discard_seg = 5;
    put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let len = put_ranges(
        &mem,
        DATA,
        &[range(0, 8, 0), range(8, 8, 0), range(16, 8, 0)],
    );
    let result = parse_descs(&mem, &cfg, &chain_with(&[r(DATA, len)]), &mut req);
    assert_request_error(
        result,
        ParseError::TooManyRanges { count: 3, max: 2 },
        VIRTIO_BLK_S_IOERR,
        &req,
        &mem,
    );

    // clear() and every parse keep the buffers.
    req.clear();
    assert!(req.iovecs.is_empty() && req.ranges.is_empty() && req.status.is_null());
    assert_eq!(req.iovecs.as_ptr(), iovecs_ptr);
    assert_eq!(req.ranges.as_ptr(), ranges_ptr);
    assert_eq!(req.iovecs.capacity(), 8);
    assert_eq!(req.ranges.capacity(), 2);
}

// ---------------------------------------------------------------- request errors: UNSUPP

#[test]
fn unknown_types_are_unsupported() {
    let mem = guest();
    // SCSI_CMD, SCSI_CMD_OUT, FLUSH|OUT, GET_LIFETIME, SECURE_ERASE, ZONE_APPEND, ZONE_REPORT,
    // ZONE_RESET_ALL, and garbage.
    for request_type in [2u32, 3, 5, 10, 14, 15, 16, 26, 0x7fff_ffff] {
        put_header(&mem, HDR, request_type, 0);
        let mut req = request();
        let result = parse_descs(&mem, &config(), &chain_with(&[w(DATA, 512)]), &mut req);
        assert_request_error(
            result,
            ParseError::UnsupportedType(request_type),
            VIRTIO_BLK_S_UNSUPP,
            &req,
            &mem,
        );
        assert_eq!(req.used_len, 513);
    }
}

#[test]
fn discard_and_write_zeroes_unsupported_when_not_offered() {
    let mem = guest();
    let mut cfg = config();
    cfg.discard = false;
    cfg.write_zeroes = false;
    let len = put_ranges(&mem, DATA, &[range(0, 8, 0)]);
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        put_header(&mem, HDR, request_type, 0);
        let mut req = request();
        let result = parse_descs(&mem, &cfg, &chain_with(&[r(DATA, len)]), &mut req);
        assert_request_error(
            result,
            ParseError::UnsupportedType(request_type),
            VIRTIO_BLK_S_UNSUPP,
            &req,
            &mem,
        );
    }
}

#[test]
fn unknown_range_flags_are_unsupported() {
    let mem = guest();
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        put_header(&mem, HDR, request_type, 0);
        let len = put_ranges(&mem, DATA, &[range(0, 8, 2)]);
        let mut req = request();
        let result = parse_descs(&mem, &config(), &chain_with(&[r(DATA, len)]), &mut req);
        assert_request_error(
            result,
            ParseError::UnsupportedFlags(2),
            VIRTIO_BLK_S_UNSUPP,
            &req,
            &mem,
        );
    }
}

#[test]
fn unmap_on_discard_is_unsupported() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let len = put_ranges(
        &mem,
        DATA,
        &[range(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
    );
    let mut req = request();
    let result = parse_descs(&mem, &config(), &chain_with(&[r(DATA, len)]), &mut req);
    assert_request_error(
        result,
        ParseError::UnmapOnDiscard,
        VIRTIO_BLK_S_UNSUPP,
        &req,
        &mem,
    );
}

// ---------------------------------------------------------------- request errors: IOERR

fn config_4k() -> DeviceConfig {
    DeviceConfig::new(CAPACITY_BYTES, 4096, 1, QUEUE_SIZE)
}

#[test]
fn read_write_length_must_be_whole_logical_blocks() {
    let mem = guest();
    let cfg = config_4k();
    for (request_type, data) in [
        (VIRTIO_BLK_T_IN, w(DATA, 512)),
        (VIRTIO_BLK_T_OUT, r(DATA, 4096 + 512)),
    ] {
        put_header(&mem, HDR, request_type, 0);
        let mut req = request();
        let result = parse_descs(&mem, &cfg, &chain_with(&[data]), &mut req);
        assert_request_error(
            result,
            ParseError::Misaligned {
                sector: 0,
                len: u64::from(data.len),
                block_size: 4096,
            },
            VIRTIO_BLK_S_IOERR,
            &req,
            &mem,
        );
    }
    // Same with 512-byte blocks: 100 bytes is not a sector.
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut req = request();
    let result = parse_descs(&mem, &config(), &chain_with(&[w(DATA, 100)]), &mut req);
    assert!(matches!(result, Err(ParseError::Misaligned { .. })));
}

#[test]
fn read_write_sector_must_be_block_aligned() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    let mut req = request();
    let result = parse_descs(&mem, &config_4k(), &chain_with(&[w(DATA, 4096)]), &mut req);
    assert_request_error(
        result,
        ParseError::Misaligned {
            sector: 1,
            len: 4096,
            block_size: 4096,
        },
        VIRTIO_BLK_S_IOERR,
        &req,
        &mem,
    );
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 8);
    parse_descs(&mem, &config_4k(), &chain_with(&[w(DATA, 4096)]), &mut req).unwrap();
}

#[test]
fn read_write_must_fit_the_capacity() {
    let mem = guest();
    let mut req = request();
    // The last sector is readable.
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, CAPACITY_SECTORS - 1);
    parse_descs(&mem, &config(), &chain_with(&[w(DATA, 512)]), &mut req).unwrap();
    // Zero bytes at the very end are fine too (QEMU allows it).
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, CAPACITY_SECTORS);
    parse_descs(&mem, &config(), &chain_with(&[]), &mut req).unwrap();
    assert_eq!(req.data_len, 0);

    for (sector, len) in [
        (CAPACITY_SECTORS - 1, 1024u32),
        (CAPACITY_SECTORS, 512),
        (CAPACITY_SECTORS + 1, 0),
        (u64::MAX, 512),
        (u64::MAX - 1, 4096),
    ] {
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, sector);
        let data: Vec<D> = if len == 0 { vec![] } else { vec![r(DATA, len)] };
        let result = parse_descs(&mem, &config(), &chain_with(&data), &mut req);
        assert_request_error(
            result,
            ParseError::SectorOutOfRange {
                sector,
                num_sectors: u64::from(len / 512),
                capacity_sectors: CAPACITY_SECTORS,
            },
            VIRTIO_BLK_S_IOERR,
            &req,
            &mem,
        );
    }
}

#[test]
fn read_write_larger_than_max_transfer_rejected() {
    let mem = guest();
    let mut cfg = config();
    cfg.max_transfer_bytes = 4096;
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut req = request();
    parse_descs(&mem, &cfg, &chain_with(&[w(DATA, 4096)]), &mut req).unwrap();
    let result = parse_descs(&mem, &cfg, &chain_with(&[w(DATA, 8192)]), &mut req);
    assert_request_error(
        result,
        ParseError::TooLarge {
            len: 8192,
            max: 4096,
        },
        VIRTIO_BLK_S_IOERR,
        &req,
        &mem,
    );
}

#[test]
fn more_segments_than_seg_max_plus_two_rejected() {
    let mem = guest();
    let mut cfg = config();
    cfg.seg_max = 2;
    let mut req = Request::for_config(&cfg);
    assert_eq!(req.iovecs.capacity(), 8, "two iovecs per allowed segment");
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let four: Vec<D> = (0..4).map(|i| w(DATA + 0x1000 * i, 512)).collect();
    parse_descs(&mem, &cfg, &chain_with(&four), &mut req).unwrap();
    let five: Vec<D> = (0..5).map(|i| w(DATA + 0x1000 * i, 512)).collect();
    let result = parse_descs(&mem, &cfg, &chain_with(&five), &mut req);
    assert_request_error(
        result,
        ParseError::TooManySegments { max: 4 },
        VIRTIO_BLK_S_IOERR,
        &req,
        &mem,
    );
    assert_eq!(req.used_len, 5 * 512 + 1);
    // Region splitting does not count against seg_max: 4 buffers, each crossing the
    // boundary between the two regions, are 8 iovecs and fine.
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let crossing: Vec<D> = (0..4).map(|_| r(REGION_SPLIT - 256, 512)).collect();
    parse_descs(&mem, &cfg, &chain_with(&crossing), &mut req).unwrap();
    assert_eq!(req.iovecs.len(), 8);
    // ... but the iovecs must fit the request: with room for 7, the 8th does not.
    let mut small = Request::with_capacity(7, 1);
    let result = parse_descs(&mem, &cfg, &chain_with(&crossing), &mut small);
    assert_eq!(result, Err(ParseError::TooManySegments { max: 7 }));
}

#[test]
fn seg_max_buffers_that_all_cross_region_boundaries_are_accepted() {
    // The config allows seg_max segments wherever they sit; a request sized by for_config
    // takes them even when every one is split in two.
    let mem = guest();
    let cfg = config();
    let mut req = Request::for_config(&cfg);
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let data: Vec<D> = (0..cfg.seg_max)
        .map(|_| w(REGION_SPLIT - 256, 512))
        .collect();
    parse_descs(&mem, &cfg, &chain_with(&data), &mut req).unwrap();
    assert_eq!(req.iovecs.len(), 2 * cfg.seg_max as usize);
}

#[test]
fn iovecs_never_exceed_iov_max() {
    let mem = guest();
    let mut cfg = config();
    cfg.seg_max = 4000;
    let mut req = Request::with_capacity(4096, 1);
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // An indirect table carrying 1025 data buffers: 1025 iovecs > IOV_MAX.
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..1025).map(|i| w(DATA + 8 * i, 8)));
    descs.push(w(STATUS, 1));
    let head = indirect_table(&mem, INDIRECT, &descs);
    let result = parse_raw_table(&mem, &cfg, &[head], &mut req);
    assert_request_error(
        result,
        ParseError::TooManySegments {
            max: blk_proto::request::IOV_MAX,
        },
        VIRTIO_BLK_S_IOERR,
        &req,
        &mem,
    );
}

#[test]
fn read_only_device_rejects_writes_discards_and_write_zeroes() {
    let mem = guest();
    let mut cfg = config();
    cfg.read_only = true;
    let mut req = request();

    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let result = parse_descs(&mem, &cfg, &chain_with(&[r(DATA, 512)]), &mut req);
    assert_request_error(result, ParseError::ReadOnly, VIRTIO_BLK_S_IOERR, &req, &mem);

    let len = put_ranges(&mem, DATA, &[range(0, 8, 0)]);
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        put_header(&mem, HDR, request_type, 0);
        let result = parse_descs(&mem, &cfg, &chain_with(&[r(DATA, len)]), &mut req);
        assert_request_error(result, ParseError::ReadOnly, VIRTIO_BLK_S_IOERR, &req, &mem);
    }

    // Reads, flushes and GET_ID still work.
    for (request_type, data) in [
        (VIRTIO_BLK_T_IN, vec![w(DATA, 512)]),
        (VIRTIO_BLK_T_FLUSH, vec![]),
        (VIRTIO_BLK_T_GET_ID, vec![w(DATA, 20)]),
    ] {
        put_header(&mem, HDR, request_type, 0);
        parse_descs(&mem, &cfg, &chain_with(&data), &mut req).unwrap();
    }
}

#[test]
fn discard_payload_must_be_whole_segments() {
    let mem = guest();
    put_ranges(&mem, DATA, &[range(0, 8, 0), range(8, 8, 0)]);
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        put_header(&mem, HDR, request_type, 0);
        for len in [0u32, 1, 15, 17, 31] {
            let data: Vec<D> = if len == 0 { vec![] } else { vec![r(DATA, len)] };
            let mut req = request();
            let result = parse_descs(&mem, &config(), &chain_with(&data), &mut req);
            assert_request_error(
                result,
                ParseError::BadDiscardPayload(len),
                VIRTIO_BLK_S_IOERR,
                &req,
                &mem,
            );
        }
    }
}

#[test]
fn more_segments_than_max_seg_rejected() {
    let mem = guest();
    let len = put_ranges(&mem, DATA, &[range(0, 8, 0), range(8, 8, 0)]);
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        put_header(&mem, HDR, request_type, 0);
        let mut req = request();
        let result = parse_descs(&mem, &config(), &chain_with(&[r(DATA, len)]), &mut req);
        assert_request_error(
            result,
            ParseError::TooManyRanges { count: 2, max: 1 },
            VIRTIO_BLK_S_IOERR,
            &req,
            &mem,
        );
    }
    // A huge claimed payload is counted, not read.
    put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let mut req = request();
    let result = parse_descs(&mem, &config(), &chain_with(&[r(DATA, 0x8_0000)]), &mut req);
    assert_eq!(
        result,
        Err(ParseError::TooManyRanges {
            count: 0x8000,
            max: 1
        })
    );
}

#[test]
fn range_larger_than_max_sectors_rejected() {
    let mem = guest();
    let mut cfg = config();
    cfg.max_discard_sectors = 64;
    cfg.max_write_zeroes_sectors = 128;
    for (request_type, max) in [(VIRTIO_BLK_T_DISCARD, 64), (VIRTIO_BLK_T_WRITE_ZEROES, 128)] {
        put_header(&mem, HDR, request_type, 0);
        let mut req = request();
        let len = put_ranges(&mem, DATA, &[range(0, max, 0)]);
        parse_descs(&mem, &cfg, &chain_with(&[r(DATA, len)]), &mut req).unwrap();
        put_ranges(&mem, DATA, &[range(0, max + 1, 0)]);
        let result = parse_descs(&mem, &cfg, &chain_with(&[r(DATA, len)]), &mut req);
        assert_request_error(
            result,
            ParseError::RangeTooLarge {
                num_sectors: max + 1,
                max,
            },
            VIRTIO_BLK_S_IOERR,
            &req,
            &mem,
        );
    }
}

#[test]
fn range_must_be_block_aligned() {
    let mem = guest();
    let cfg = config_4k();
    put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    for (sector, num_sectors) in [(1u64, 8u32), (8, 1), (8, 12)] {
        let len = put_ranges(&mem, DATA, &[range(sector, num_sectors, 0)]);
        let mut req = request();
        let result = parse_descs(&mem, &cfg, &chain_with(&[r(DATA, len)]), &mut req);
        assert_request_error(
            result,
            ParseError::Misaligned {
                sector,
                len: u64::from(num_sectors) * 512,
                block_size: 4096,
            },
            VIRTIO_BLK_S_IOERR,
            &req,
            &mem,
        );
    }
    let len = put_ranges(&mem, DATA, &[range(8, 16, 0)]);
    let mut req = request();
    parse_descs(&mem, &cfg, &chain_with(&[r(DATA, len)]), &mut req).unwrap();
}

#[test]
fn range_must_fit_the_capacity() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    for (sector, num_sectors) in [
        (CAPACITY_SECTORS - 8, 16u32),
        (CAPACITY_SECTORS + 1, 0),
        (u64::MAX - 3, 8),
        (u64::MAX, 1),
    ] {
        let len = put_ranges(&mem, DATA, &[range(sector, num_sectors, 0)]);
        let mut req = request();
        let result = parse_descs(&mem, &config(), &chain_with(&[r(DATA, len)]), &mut req);
        assert_request_error(
            result,
            ParseError::SectorOutOfRange {
                sector,
                num_sectors: u64::from(num_sectors),
                capacity_sectors: CAPACITY_SECTORS,
            },
            VIRTIO_BLK_S_IOERR,
            &req,
            &mem,
        );
    }
}

#[test]
fn zero_sector_range_is_accepted_and_dropped() {
    // QEMU accepts num_sectors == 0 (sector <= capacity) as a no-op.
    let mem = guest();
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        put_header(&mem, HDR, request_type, 0);
        for sector in [0, 100, CAPACITY_SECTORS] {
            let len = put_ranges(&mem, DATA, &[range(sector, 0, 0)]);
            let mut req = request();
            parse_descs(&mem, &config(), &chain_with(&[r(DATA, len)]), &mut req).unwrap();
            assert!(req.ranges.is_empty());
            assert_eq!(req.status, host(&mem, STATUS));
        }
    }
}

#[test]
fn range_errors_take_precedence_over_flag_errors_as_in_qemu() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let len = put_ranges(&mem, DATA, &[range(CAPACITY_SECTORS, 8, 0xff)]);
    let mut req = request();
    let result = parse_descs(&mem, &config(), &chain_with(&[r(DATA, len)]), &mut req);
    assert_eq!(result.unwrap_err().status(), Some(VIRTIO_BLK_S_IOERR));
}

// ---------------------------------------------------------------- chain errors

#[test]
fn chain_without_writable_descriptor_has_no_status() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let mut req = request();
    let result = parse_descs(&mem, &config(), &[r(HDR, 16), r(DATA, 512)], &mut req);
    assert_chain_error(result, ParseError::NoWritableDescriptor);
    // Only empty writable descriptors: no status byte either.
    let result = parse_descs(&mem, &config(), &[r(HDR, 16), w(STATUS, 0)], &mut req);
    assert_chain_error(result, ParseError::NoWritableDescriptor);
}

#[test]
fn header_shorter_than_16_bytes() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut req = request();
    for (descs, readable) in [
        (vec![r(HDR, 15), w(STATUS, 1)], 15),
        (
            vec![r(HDR, 8), r(HDR + 8, 7), w(DATA, 512), w(STATUS, 1)],
            15,
        ),
        (vec![w(DATA, 512), w(STATUS, 1)], 0),
        (vec![r(HDR, 4)], 4),
    ] {
        let result = parse_descs(&mem, &config(), &descs, &mut req);
        assert_chain_error(result, ParseError::HeaderTooShort(readable));
    }
}

#[test]
fn readable_after_writable_is_a_chain_error() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let mut req = request();
    let descs = [r(HDR, 16), w(STATUS, 1), r(DATA, 512)];
    let result = parse_descs(&mem, &config(), &descs, &mut req);
    assert_chain_error(result, ParseError::ReadableAfterWritable);
}

#[test]
fn addresses_outside_guest_memory_are_chain_errors() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(Vec<D>, u64, u32)> = vec![
        // Header outside memory.
        (vec![r(MEM_END, 16), w(STATUS, 1)], MEM_END, 16),
        // Data entirely outside, partly outside (crossing the end of memory), wrapping around.
        (
            chain_with(&[w(MEM_END + 0x1000, 512)]),
            MEM_END + 0x1000,
            512,
        ),
        (chain_with(&[w(MEM_END - 256, 512)]), MEM_END - 256, 512),
        (chain_with(&[w(u64::MAX - 255, 512)]), u64::MAX - 255, 512),
        // Status byte outside memory.
        (vec![r(HDR, 16), w(DATA, 512), w(MEM_END, 1)], MEM_END, 1),
        // A huge length from a valid address.
        (chain_with(&[w(DATA, 0xffff_0000)]), DATA, 0xffff_0000),
    ];
    for (descs, addr, len) in cases {
        let mut req = request();
        let result = parse_descs(&mem, &config(), &descs, &mut req);
        assert_chain_error(result, ParseError::AddressNotInGuestMemory { addr, len });
    }
    // Also for a write's readable data and for types that ignore their data.
    for request_type in [VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, 0x7777] {
        put_header(&mem, HDR, request_type, 0);
        let mut req = request();
        let result = parse_descs(&mem, &config(), &chain_with(&[r(MEM_END, 512)]), &mut req);
        assert_chain_error(
            result,
            ParseError::AddressNotInGuestMemory {
                addr: MEM_END,
                len: 512,
            },
        );
    }
}

#[test]
fn chain_over_4_gib_is_a_chain_error() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut req = request();
    // 16 + (2^32 - 16) bytes: virtio-queue stops yielding, so the chain never ends normally.
    let descs = [r(HDR, 16), w(DATA, 0xffff_fff0), w(STATUS, 1)];
    let result = parse_descs(&mem, &config(), &descs, &mut req);
    assert_chain_error(result, ParseError::DescriptorChain);
}

#[test]
fn descriptor_loop_is_a_chain_error() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut req = request();
    // header -> data -> status -> data -> ... (writable only, so ordering holds).
    let table = [
        raw(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        raw(STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1),
    ];
    let result = parse_raw_table(&mem, &config(), &table, &mut req);
    assert_chain_error(result, ParseError::DescriptorChain);
    // A loop back to the header is caught too (as readable-after-writable).
    let table = [
        raw(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw(STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0),
    ];
    let result = parse_raw_table(&mem, &config(), &table, &mut req);
    assert_eq!(result.unwrap_err().status(), None);
}

#[test]
fn next_index_outside_the_table_is_a_chain_error() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut req = request();
    let table = [raw(HDR, 16, VRING_DESC_F_NEXT, QUEUE_SIZE + 44)];
    let result = parse_raw_table(&mem, &config(), &table, &mut req);
    assert_chain_error(result, ParseError::DescriptorChain);
}

#[test]
fn malformed_indirect_tables_are_chain_errors() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let good = [r(HDR, 16), w(DATA, 512), w(STATUS, 1)];

    // A loop inside the table.
    let head = indirect_table(&mem, INDIRECT, &good);
    write_raw(
        &mem,
        INDIRECT + 32,
        raw(STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
    );
    let mut req = request();
    let result = parse_raw_table(&mem, &config(), &[head], &mut req);
    assert_chain_error(result, ParseError::DescriptorChain);

    // An indirect descriptor inside an indirect table.
    let head = indirect_table(&mem, INDIRECT, &good);
    let nested = indirect_table(&mem, INDIRECT + 0x1000, &good);
    write_raw(
        &mem,
        INDIRECT + 16,
        raw(
            nested_addr(&nested),
            48,
            VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT,
            2,
        ),
    );
    let result = parse_raw_table(&mem, &config(), &[head], &mut req);
    assert_chain_error(result, ParseError::DescriptorChain);

    // A table length that is not a multiple of 16, an empty table, a table outside memory.
    for (addr, len) in [(INDIRECT, 40u32), (INDIRECT, 0), (MEM_END, 48)] {
        indirect_table(&mem, INDIRECT, &good);
        let head = raw(addr, len, VRING_DESC_F_INDIRECT, 0);
        let result = parse_raw_table(&mem, &config(), &[head], &mut req);
        assert_chain_error(result, ParseError::DescriptorChain);
    }

    // A direct descriptor announcing a bad indirect table as its successor.
    let table = [
        raw(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw(INDIRECT, 40, VRING_DESC_F_INDIRECT, 0),
    ];
    let result = parse_raw_table(&mem, &config(), &table, &mut req);
    assert_chain_error(result, ParseError::DescriptorChain);
}

fn nested_addr(desc: &virtio_queue::desc::RawDescriptor) -> u64 {
    virtio_queue::desc::split::Descriptor::from(*desc).addr().0
}

#[test]
fn chain_errors_win_over_request_errors() {
    let mem = guest();
    put_header(&mem, HDR, 0x7777, 0);
    let mut req = request();
    let descs = [r(HDR, 16), w(MEM_END, 512), w(STATUS, 1)];
    let result = parse_descs(&mem, &config(), &descs, &mut req);
    assert_chain_error(
        result,
        ParseError::AddressNotInGuestMemory {
            addr: MEM_END,
            len: 512,
        },
    );
}

#[test]
fn previous_request_state_is_cleared() {
    let mem = guest();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 8);
    let mut req = request();
    parse_descs(&mem, &config(), &chain_with(&[w(DATA, 512)]), &mut req).unwrap();
    assert!(!req.iovecs.is_empty());
    let result = parse_descs(&mem, &config(), &[r(HDR, 16)], &mut req);
    assert_eq!(result, Err(ParseError::NoWritableDescriptor));
    assert!(req.iovecs.is_empty(), "stale iovecs");
    assert!(req.status.is_null(), "stale status");
    assert_eq!(req.used_len, 0);
}

// ---------------------------------------------------------------- data direction

#[test]
fn a_read_whose_data_is_device_readable_gets_ioerr() {
    let mem = guest();
    let mut req = request();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // All the data readable by the device: nothing could be read into it.
    let result = parse_descs(&mem, &config(), &chain_with(&[r(DATA, 4096)]), &mut req);
    assert_request_error(
        result,
        ParseError::WrongDirection {
            kind: RequestKind::Read,
            bytes: 4096,
        },
        VIRTIO_BLK_S_IOERR,
        &req,
        &mem,
    );
    // Readable bytes sharing the header's descriptor count too, even beside writable data.
    let result = parse_descs(
        &mem,
        &config(),
        &[r(HDR, 16 + 512), w(DATA, 512), w(STATUS, 1)],
        &mut req,
    );
    assert_request_error(
        result,
        ParseError::WrongDirection {
            kind: RequestKind::Read,
            bytes: 512,
        },
        VIRTIO_BLK_S_IOERR,
        &req,
        &mem,
    );
    assert_eq!(req.used_len, 513, "used len = the writable bytes");
}

#[test]
fn a_write_whose_data_is_device_writable_gets_ioerr() {
    let mem = guest();
    let mut req = request();
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let result = parse_descs(&mem, &config(), &chain_with(&[w(DATA, 4096)]), &mut req);
    assert_request_error(
        result,
        ParseError::WrongDirection {
            kind: RequestKind::Write,
            bytes: 4096,
        },
        VIRTIO_BLK_S_IOERR,
        &req,
        &mem,
    );
    // Data before the status byte in the status's own descriptor is writable data too.
    let result = parse_descs(&mem, &config(), &[r(HDR, 16), w(DATA, 513)], &mut req);
    assert_eq!(
        result,
        Err(ParseError::WrongDirection {
            kind: RequestKind::Write,
            bytes: 512,
        })
    );
    assert_eq!(req.status, host(&mem, DATA + 512));
}

#[test]
fn reads_and_writes_of_no_data_are_still_valid() {
    // As in QEMU: nothing asked, nothing done, nothing believed.
    let mem = guest();
    let mut req = request();
    for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        put_header(&mem, HDR, t, 0);
        parse_descs(&mem, &config(), &chain_with(&[]), &mut req).unwrap();
        assert_eq!(req.data_len, 0);
    }
}

// ---------------------------------------------------------------- what the config promises

#[test]
fn seg_max_segments_of_size_max_are_accepted_in_both_directions() {
    // The largest request the config space allows (seg_max segments of size_max bytes) is
    // served, never TooLarge or TooManySegments; the segments may all alias one buffer.
    let mem = guest();
    for (lbs, queue_size, max_transfer) in [
        (512u32, 256u16, 32u32 << 20),
        (512, 1024, 32 << 20),
        (4096, 128, 32 << 20),
        (4096, 1024, 8 << 20),
        (512, 64, 1 << 20),
    ] {
        let mut cfg = DeviceConfig::new(CAPACITY_BYTES, lbs, 1, queue_size);
        cfg.max_transfer_bytes = max_transfer;
        cfg.validate().unwrap();
        let size_max = cfg.size_max();
        assert!(u64::from(size_max) < INDIRECT - DATA, "test layout");
        let mut req = Request::for_config(&cfg);
        for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            put_header(&mem, HDR, t, 0);
            let data = (0..cfg.seg_max).map(|_| {
                if t == VIRTIO_BLK_T_IN {
                    w(DATA, size_max)
                } else {
                    r(DATA, size_max)
                }
            });
            let mut descs = vec![r(HDR, 16)];
            descs.extend(data);
            descs.push(w(STATUS, 1));
            let head = indirect_table(&mem, INDIRECT, &descs);
            let what = format!("lbs {lbs} queue {queue_size} max {max_transfer} type {t}");
            parse_raw_table(&mem, &cfg, &[head], &mut req)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(req.data_len, cfg.seg_max * size_max, "{what}");
        }
    }
}
