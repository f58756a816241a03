package bolt

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"

	bbolt "go.etcd.io/bbolt"
	"golang.org/x/mod/sumdb/tlog"

	"kmsd/kms"
)

// Each record is stored under its index (u64, big endian) as
//
//	k (1 byte) | k tree hashes (32 bytes each) | canonical record
//
// where the hashes are the ones tlog.StoredHashes says writing the record
// stores (its leaf hash, then the hashes of the subtrees it completes, by
// level). Keeping them beside the record makes an append dirty one run of
// leaf pages instead of two.
var (
	bucketAuditRecords     = []byte("audit_records")     // u64 index -> hashes + canonical record
	bucketAuditCheckpoints = []byte("audit_checkpoints") // u64 tree size -> signed note
)

var _ kms.AuditStore = (*Store)(nil)

func u64(n uint64) []byte { return binary.BigEndian.AppendUint64(nil, n) }

func auditSize(tx *bbolt.Tx) uint64 {
	k, _ := tx.Bucket(bucketAuditRecords).Cursor().Last()
	if k == nil {
		return 0
	}
	return binary.BigEndian.Uint64(k) + 1
}

// splitValue splits a stored value into its tree hashes and the record.
func splitValue(v []byte) (hashes, record []byte, err error) {
	if len(v) < 1 || len(v) < 1+int(v[0])*tlog.HashSize {
		return nil, nil, errors.New("audit: malformed stored record")
	}
	n := 1 + int(v[0])*tlog.HashSize
	return v[1:n], v[n:], nil
}

// txHashReader reads stored tree hashes inside a transaction: the hash at
// (level, m) was stored with record ((m+1) << level) - 1, at position level.
func txHashReader(tx *bbolt.Tx) tlog.HashReader {
	b := tx.Bucket(bucketAuditRecords)
	return tlog.HashReaderFunc(func(indexes []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(indexes))
		for i, idx := range indexes {
			level, m := tlog.SplitStoredHashIndex(idx)
			rec := uint64((m+1)<<level) - 1
			hs, _, err := splitValue(b.Get(u64(rec)))
			if err != nil || len(hs) < (level+1)*tlog.HashSize {
				return nil, fmt.Errorf("audit: tree hash %d (record %d) missing", idx, rec)
			}
			copy(out[i][:], hs[level*tlog.HashSize:])
		}
		return out, nil
	})
}

// appendAudit appends records to the log inside tx: it assigns each its
// index and the previous record's leaf hash, stores the canonical bytes and
// the Merkle tree hashes tlog needs, and advances the size.
func appendAudit(tx *bbolt.Tx, recs []*kms.AuditRecord) error {
	if len(recs) == 0 {
		return nil
	}
	size := auditSize(tx)
	rb := tx.Bucket(bucketAuditRecords)
	// Keys only ever grow: pack pages full instead of splitting them in half.
	rb.FillPercent = 1.0
	hr := txHashReader(tx)
	for _, r := range recs {
		r.Index, r.PrevHash = size, ""
		if size > 0 {
			prev, err := hr.ReadHashes([]int64{tlog.StoredHashIndex(0, int64(size-1))})
			if err != nil {
				return err
			}
			r.PrevHash = hex.EncodeToString(prev[0][:])
		}
		data := r.Encode()
		hashes, err := tlog.StoredHashes(int64(size), data, hr)
		if err != nil {
			return err
		}
		v := make([]byte, 0, 1+len(hashes)*tlog.HashSize+len(data))
		v = append(v, byte(len(hashes)))
		for _, h := range hashes {
			v = append(v, h[:]...)
		}
		v = append(v, data...)
		if err := rb.Put(u64(size), v); err != nil {
			return err
		}
		size++
	}
	return nil
}

func markCommitted(recs []*kms.AuditRecord) {
	for _, r := range recs {
		r.Committed = true
	}
}

type appendReq struct {
	rec  *kms.AuditRecord
	done chan error
}

// errStoreClosed is returned by AppendAudit after Close.
var errStoreClosed = errors.New("the store is closed")

const maxGroup = 4096

// committer is the group commit loop: it takes every record waiting, commits
// them in one transaction (one fsync pair), and answers each caller. While
// one commit runs, the next group gathers, so under load many requests share
// one fsync and an idle log costs one commit per record, with no added
// delay.
func (s *Store) committer() {
	defer close(s.stopped)
	batch := make([]appendReq, 0, maxGroup)
	for {
		batch = batch[:0]
		select {
		case <-s.quit:
			return
		case req := <-s.appendCh:
			batch = append(batch, req)
		}
	gather:
		for len(batch) < maxGroup {
			select {
			case req := <-s.appendCh:
				batch = append(batch, req)
			default:
				break gather
			}
		}
		recs := make([]*kms.AuditRecord, len(batch))
		for i, req := range batch {
			recs[i] = req.rec
		}
		err := s.update(func(tx *bbolt.Tx) error { return appendAudit(tx, recs) })
		if err == nil {
			s.auditGroups.Add(1)
			markCommitted(recs)
		}
		for _, req := range batch {
			req.done <- err
		}
	}
}

// AppendAudit implements kms.AuditStore.
func (s *Store) AppendAudit(ctx context.Context, rec *kms.AuditRecord) error {
	req := appendReq{rec: rec, done: make(chan error, 1)}
	select {
	case s.appendCh <- req:
	case <-s.quit:
		return errStoreClosed
	case <-ctx.Done():
		return ctx.Err()
	}
	// Once queued the record is committed or refused; wait for the answer
	// even if ctx ends, so the caller never reports a record it cannot vouch
	// for.
	return <-req.done
}

// AuditSize implements kms.AuditStore.
func (s *Store) AuditSize(ctx context.Context) (uint64, error) {
	var n uint64
	err := s.db.View(func(tx *bbolt.Tx) error { n = auditSize(tx); return nil })
	return n, err
}

// AuditRecords implements kms.AuditStore.
func (s *Store) AuditRecords(ctx context.Context, start, end uint64) ([][]byte, error) {
	var out [][]byte
	err := s.db.View(func(tx *bbolt.Tx) error {
		if size := auditSize(tx); start > end || end > size {
			return &kms.Error{Kind: kms.KindInvalid, Msg: fmt.Sprintf("records [%d, %d) are outside the log of %d records", start, end, size)}
		}
		c := tx.Bucket(bucketAuditRecords).Cursor()
		i := start
		for k, v := c.Seek(u64(start)); k != nil && i < end; k, v = c.Next() {
			if binary.BigEndian.Uint64(k) != i {
				return fmt.Errorf("audit: record %d missing", i)
			}
			_, rec, err := splitValue(v)
			if err != nil {
				return err
			}
			out = append(out, append([]byte(nil), rec...))
			i++
		}
		if i != end {
			return fmt.Errorf("audit: record %d missing", i)
		}
		return nil
	})
	return out, err
}

// AuditHashes implements kms.AuditStore.
func (s *Store) AuditHashes(ctx context.Context, indexes []int64) ([][32]byte, error) {
	var out [][32]byte
	err := s.db.View(func(tx *bbolt.Tx) error {
		hs, err := txHashReader(tx).ReadHashes(indexes)
		if err != nil {
			return err
		}
		out = make([][32]byte, len(hs))
		for i, h := range hs {
			out[i] = h
		}
		return nil
	})
	return out, err
}

// PutCheckpoint implements kms.AuditStore.
func (s *Store) PutCheckpoint(ctx context.Context, size uint64, note []byte) error {
	return s.update(func(tx *bbolt.Tx) error {
		return tx.Bucket(bucketAuditCheckpoints).Put(u64(size), note)
	})
}

// LatestCheckpoint implements kms.AuditStore.
func (s *Store) LatestCheckpoint(ctx context.Context) (uint64, []byte, error) {
	var size uint64
	var note []byte
	err := s.db.View(func(tx *bbolt.Tx) error {
		k, v := tx.Bucket(bucketAuditCheckpoints).Cursor().Last()
		if k == nil {
			return &kms.Error{Kind: kms.KindNotFound, Msg: "no audit checkpoint yet"}
		}
		size, note = binary.BigEndian.Uint64(k), append([]byte(nil), v...)
		return nil
	})
	return size, note, err
}

// Commits counts the write transactions committed so far (bbolt makes two
// fdatasync calls per commit: pages, then the meta page).
func (s *Store) Commits() uint64 { return s.commits.Load() }

// AuditGroups counts the group commits of the audit committer.
func (s *Store) AuditGroups() uint64 { return s.auditGroups.Load() }
