package bolt

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	bbolt "go.etcd.io/bbolt"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/kms"
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

// putRecords stores encoded records first, first+1, ... in tx with the
// Merkle tree hashes tlog needs; earlier records must be in tx already.
func putRecords(tx *bbolt.Tx, first uint64, datas [][]byte) error {
	rb := tx.Bucket(bucketAuditRecords)
	// Keys only ever grow: pack pages full instead of splitting them in half.
	rb.FillPercent = 1.0
	hr := txHashReader(tx)
	for i, data := range datas {
		idx := first + uint64(i)
		hashes, err := tlog.StoredHashes(int64(idx), data, hr)
		if err != nil {
			return err
		}
		v := make([]byte, 0, 1+len(hashes)*tlog.HashSize+len(data))
		v = append(v, byte(len(hashes)))
		for _, h := range hashes {
			v = append(v, h[:]...)
		}
		v = append(v, data...)
		if err := rb.Put(u64(idx), v); err != nil {
			return err
		}
	}
	return nil
}

// encodeNext gives recs the next indexes and the chain of previous leaf
// hashes, starting after (next, leaf), and returns their canonical bytes
// and the new (next, leaf). Callers hold auditMu.
func encodeNext(recs []*kms.AuditRecord, next uint64, leaf tlog.Hash) ([][]byte, uint64, tlog.Hash) {
	datas := make([][]byte, len(recs))
	for i, r := range recs {
		r.Index, r.PrevHash = next, ""
		if next > 0 {
			r.PrevHash = hex.EncodeToString(leaf[:])
		}
		datas[i] = r.Encode()
		leaf = tlog.RecordHash(datas[i])
		next++
	}
	return datas, next, leaf
}

// appendAudit appends records inside a transaction run by update (which
// holds auditMu and has already moved the WAL's waiting records into tx).
func (s *Store) appendAudit(tx *bbolt.Tx, recs []*kms.AuditRecord) error {
	if len(recs) == 0 {
		return nil
	}
	datas, next, leaf := encodeNext(recs, s.next, s.lastLeaf)
	if err := putRecords(tx, s.next, datas); err != nil {
		return err
	}
	s.next, s.lastLeaf = next, leaf
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

// gatherWait bounds how long a group waits for requests that are still
// being served (Expect) to bring their records.
const gatherWait = 200 * time.Microsecond

// committer is the group commit loop: it takes every record waiting, and,
// while requests announced by Expect are still being served, waits (at
// most gatherWait) for their records to join; then it writes the group as
// one WAL frame with one fdatasync and answers each caller. While one group
// commits the next gathers, so under load many requests share one fsync,
// and an idle log costs one fdatasync per record with no added delay.
func (s *Store) committer() {
	defer close(s.stopped)
	batch := make([]appendReq, 0, maxGroup)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	drain := func() {
		for len(batch) < maxGroup {
			select {
			case req := <-s.appendCh:
				batch = append(batch, req)
			default:
				return
			}
		}
	}
	for {
		batch = batch[:0]
		select {
		case <-s.quit:
			// Answer whatever was queued before the store closed.
			for {
				select {
				case req := <-s.appendCh:
					req.done <- errStoreClosed
				default:
					return
				}
			}
		case req := <-s.appendCh:
			batch = append(batch, req)
		}
		drain()
		if s.expected.Load() > 0 {
			timer.Reset(gatherWait)
		wait:
			for s.expected.Load() > 0 && len(batch) < maxGroup {
				select {
				case req := <-s.appendCh:
					batch = append(batch, req)
					drain()
				case <-timer.C:
					break wait
				}
			}
			timer.Stop()
		}
		recs := make([]*kms.AuditRecord, len(batch))
		for i, req := range batch {
			recs[i] = req.rec
		}
		err := s.commitGroup(recs)
		if err == nil {
			s.auditGroups.Add(1)
			markCommitted(recs)
		}
		for _, req := range batch {
			req.done <- err
		}
	}
}

// commitGroup makes recs durable as one WAL frame. Groups go through a
// bbolt transaction instead (which also carries every record waiting in
// the WAL) when the frame is larger than the whole WAL, and for the rest of
// the process's life once a WAL write has failed.
func (s *Store) commitGroup(recs []*kms.AuditRecord) error {
	viaBolt := func() error {
		return s.update(func(tx *bbolt.Tx) error { return s.appendAudit(tx, recs) })
	}
	for attempt := 0; ; attempt++ {
		s.auditMu.Lock()
		if s.walGone {
			s.auditMu.Unlock()
			if err := s.recreateWAL(); err != nil {
				return err
			}
			continue
		}
		if s.walBroken {
			s.auditMu.Unlock()
			return viaBolt()
		}
		datas, next, leaf := encodeNext(recs, s.next, s.lastLeaf)
		frame := s.wal.encode(s.next, datas)
		off, ok := s.wal.place(int64(len(frame)))
		if !ok {
			s.auditMu.Unlock()
			if attempt > 0 || int64(len(frame)) > s.wal.size {
				return viaBolt() // only a frame larger than the WAL fails twice
			}
			// The ring is full of records bbolt has not taken yet: move
			// them now, then retry once.
			if err := s.flushAudit(); err != nil {
				return fmt.Errorf("audit: the WAL is full and cannot be flushed: %w", err)
			}
			continue
		}
		if err := s.wal.write(frame, off, next); err != nil {
			// What reached the disk is unknown. Invalidate the frame if
			// the disk still lets us (best effort), and send every later
			// group through bbolt, whose commits supersede the frame
			// anyway: WAL records below bbolt's size are ignored at open.
			s.walBroken = true
			s.wal.invalidate(off)
			s.auditMu.Unlock()
			return fmt.Errorf("audit WAL: %w", err)
		}
		s.walSyncs.Add(1)
		if s.wal.replaced() {
			// The frame went to a file no restart will read: refuse its
			// records (their indexes are reused), and re-create the WAL
			// before taking more.
			s.walGone = true
			s.auditMu.Unlock()
			if err := s.recreateWAL(); err != nil {
				return err
			}
			return errWALGone
		}
		s.next, s.lastLeaf = next, leaf
		s.pending = append(s.pending, datas...)
		flush := len(s.pending) >= walFlushRecords || s.wal.used > s.wal.size/2
		s.auditMu.Unlock()
		if flush {
			select {
			case s.flushCh <- struct{}{}:
			default:
			}
		}
		return nil
	}
}

// flushAudit moves the records waiting in the WAL into bbolt in one
// transaction. The WAL keeps taking groups meanwhile: only the records
// waiting when it starts move.
func (s *Store) flushAudit() error {
	s.auditMu.Lock()
	waiting := len(s.pending)
	s.auditMu.Unlock()
	if waiting == 0 {
		return nil // nothing to move: no write transaction for an audit read
	}
	s.writeMu.Lock() // excludes update and other flushes until the bookkeeping is done
	defer s.writeMu.Unlock()
	tx, err := s.db.Begin(true)
	if err != nil {
		return err
	}
	s.auditMu.Lock()
	batch := s.pending
	first := s.next - uint64(len(batch))
	s.auditMu.Unlock()
	if len(batch) == 0 {
		return tx.Rollback()
	}
	if err := putRecords(tx, first, batch); err != nil {
		tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	s.commits.Add(1)
	s.auditMu.Lock()
	s.pending = s.pending[len(batch):]
	s.wal.flushed(first + uint64(len(batch)))
	s.auditMu.Unlock()
	return nil
}

// flusher moves WAL records into bbolt when many wait, and every
// flushInterval when any do.
func (s *Store) flusher() {
	defer close(s.flusherStopped)
	t := time.NewTicker(flushInterval)
	defer t.Stop()
	for {
		select {
		case <-s.quit:
			return
		case <-s.flushCh:
		case <-t.C:
		}
		s.auditMu.Lock()
		if !s.walBroken && s.wal.replaced() {
			s.walGone = true
		}
		gone := s.walGone
		s.auditMu.Unlock()
		if gone {
			if err := s.recreateWAL(); err != nil {
				s.flushErrors.Add(1) // groups stay refused; retried at the next tick
			}
			continue
		}
		if err := s.flushAudit(); err != nil {
			s.flushErrors.Add(1) // retried at the next tick; the records stay durable in the WAL
		}
	}
}

var flushInterval = 200 * time.Millisecond // a variable for tests

// Expect announces a record on its way (a request being served); release
// says it has been handed to AppendAudit or will not come. The group
// commit waits briefly for announced records to join it.
func (s *Store) Expect() (release func()) {
	s.expected.Add(1)
	var once atomic.Bool
	return func() {
		if once.CompareAndSwap(false, true) {
			s.expected.Add(-1)
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
	// for. A record queued as the store closed, after the committer's last
	// look at the queue, is refused.
	select {
	case err := <-req.done:
		return err
	case <-s.stopped:
		select {
		case err := <-req.done:
			return err
		default:
			return errStoreClosed
		}
	}
}

// AuditSize implements kms.AuditStore. Like every audit read, it first
// moves the records waiting in the WAL into bbolt.
func (s *Store) AuditSize(ctx context.Context) (uint64, error) {
	if err := s.flushAudit(); err != nil {
		return 0, err
	}
	var n uint64
	err := s.db.View(func(tx *bbolt.Tx) error { n = auditSize(tx); return nil })
	return n, err
}

// AuditRecords implements kms.AuditStore.
func (s *Store) AuditRecords(ctx context.Context, start, end uint64) ([][]byte, error) {
	if err := s.flushAudit(); err != nil {
		return nil, err
	}
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
	if err := s.flushAudit(); err != nil {
		return nil, err
	}
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

// Commits counts the bbolt transactions committed so far (bbolt makes two
// fdatasync calls per commit: pages, then the meta page).
func (s *Store) Commits() uint64 { return s.commits.Load() }

// FlushErrors counts background moves of WAL records into bbolt that
// failed (retried at the next tick; the records stay durable in the WAL).
func (s *Store) FlushErrors() uint64 { return s.flushErrors.Load() }

// WALSyncs counts the audit WAL frames written (one fdatasync each).
func (s *Store) WALSyncs() uint64 { return s.walSyncs.Load() }

// Fsyncs counts the fsync-class calls made for commits: two per bbolt
// commit, one per WAL frame.
func (s *Store) Fsyncs() uint64 { return 2*s.commits.Load() + s.walSyncs.Load() }

// AuditGroups counts the group commits of the audit committer.
func (s *Store) AuditGroups() uint64 { return s.auditGroups.Load() }
