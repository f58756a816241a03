package bolt

import (
	"context"
	"encoding/binary"
	"fmt"

	bbolt "go.etcd.io/bbolt"

	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

// The audit log's rows (audit/engine decides what they hold) under their
// index (u64, big endian), and its signed checkpoints under their tree
// size.
var (
	bucketAuditRecords     = []byte("audit_records")     // u64 index -> row
	bucketAuditCheckpoints = []byte("audit_checkpoints") // u64 tree size -> signed note
)

var _ engine.Rows = (*Store)(nil)

func u64(n uint64) []byte { return binary.BigEndian.AppendUint64(nil, n) }

func auditSize(tx *bbolt.Tx) (uint64, error) {
	k, _ := tx.Bucket(bucketAuditRecords).Cursor().Last()
	if k == nil {
		return 0, nil
	}
	if len(k) != 8 {
		return 0, fmt.Errorf("audit: malformed row key %x", k)
	}
	return binary.BigEndian.Uint64(k) + 1, nil
}

// appendAudit stages recs in the audit log inside a transaction run by
// update and writes the batch's rows; update tells the log how the
// transaction ended. With recs empty and rows waiting in the log's journal
// (flush), those move.
func (s *Store) appendAudit(ctx context.Context, r *rtx, recs []*kms.AuditRecord, flush bool) error {
	if len(recs) == 0 && !flush {
		return nil
	}
	if s.audit == nil {
		return fmt.Errorf("audit records without an audit log")
	}
	b, err := s.audit.Stage(ctx, recs)
	if err != nil {
		return err
	}
	s.batch = b
	if len(b.Rows) == 0 {
		return nil
	}
	end, err := auditSize(r.Tx)
	if err != nil {
		return err
	}
	if end != b.First {
		return fmt.Errorf("%w: rows end at %d, the batch starts at %d", engine.ErrConflict, end, b.First)
	}
	// Keys only ever grow: pack pages full instead of splitting them in half.
	r.Bucket(bucketAuditRecords).FillPercent = 1.0
	for i, row := range b.Rows {
		if err := r.put(bucketAuditRecords, u64(b.First+uint64(i)), row); err != nil {
			return err
		}
	}
	return r.put(bucketMeta, keyAuditEnd, u64(b.First+uint64(len(b.Rows))))
}

// WriteAudit implements engine.Rows.
func (s *Store) WriteAudit(ctx context.Context, recs []*kms.AuditRecord) error {
	return s.update(func(r *rtx) error { return s.appendAudit(ctx, r, recs, true) })
}

// RowsEnd implements engine.Rows.
func (s *Store) RowsEnd(ctx context.Context) (uint64, error) {
	var n uint64
	err := s.db.View(func(tx *bbolt.Tx) error {
		var err error
		n, err = auditSize(tx)
		return err
	})
	return n, err
}

// ReadRows implements engine.Rows.
func (s *Store) ReadRows(ctx context.Context, start, end uint64) ([][]byte, error) {
	var out [][]byte
	err := s.db.View(func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucketAuditRecords).Cursor()
		i := start
		for k, v := c.Seek(u64(start)); k != nil && i < end; k, v = c.Next() {
			if len(k) != 8 || binary.BigEndian.Uint64(k) != i {
				return fmt.Errorf("audit: record %d missing", i)
			}
			row, _, err := s.auth.Open(recPath(bucketAuditRecords, k), v)
			if err != nil {
				return err
			}
			out = append(out, append([]byte(nil), row...))
			i++
		}
		if i != end {
			return fmt.Errorf("audit: record %d missing", i)
		}
		return nil
	})
	return out, err
}

var _ engine.Pruner = (*Store)(nil)

// pruneBatch bounds the rows one pruning transaction deletes.
const pruneBatch = 2048

// PruneRows implements engine.Pruner: bbolt frees the pages of the rows
// deleted and reuses them for the rows appended later, so the file stops
// growing once retention is reached.
func (s *Store) PruneRows(ctx context.Context, below uint64) (int, error) {
	n := 0
	err := s.update(func(r *rtx) error {
		n = 0
		old, err := prunedBelow(r.a, r.Tx)
		if err != nil {
			return err
		}
		if below < old {
			below = old
		}
		keep := engine.Keep(below)
		b := r.Bucket(bucketAuditRecords)
		var del [][]byte
		c := b.Cursor()
		for k, _ := c.First(); k != nil && len(del) < pruneBatch; k, _ = c.Next() {
			if len(k) != 8 {
				return fmt.Errorf("audit: malformed row key %x", k)
			}
			i := binary.BigEndian.Uint64(k)
			if i >= below {
				break
			}
			if !keep(i) {
				del = append(del, append([]byte(nil), k...))
			}
		}
		for _, k := range del {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		n = len(del)
		if below != old {
			return r.put(bucketMeta, keyAuditPruned, u64(below))
		}
		return nil
	})
	return n, err
}

// PrunedBelow implements engine.Pruner.
func (s *Store) PrunedBelow(ctx context.Context) (uint64, error) {
	var n uint64
	err := s.db.View(func(tx *bbolt.Tx) error {
		var err error
		n, err = prunedBelow(s.auth, tx)
		return err
	})
	return n, err
}

func prunedBelow(a *storekit.Auth, tx *bbolt.Tx) (uint64, error) {
	body, err := get(a, tx, bucketMeta, keyAuditPruned)
	if err != nil || body == nil {
		return 0, err
	}
	if len(body) != 8 {
		return 0, fmt.Errorf("audit: malformed %s", keyAuditPruned)
	}
	return binary.BigEndian.Uint64(body), nil
}

// PutCheckpoint implements engine.Rows.
func (s *Store) PutCheckpoint(ctx context.Context, size uint64, note []byte) error {
	return s.update(func(r *rtx) error { return r.put(bucketAuditCheckpoints, u64(size), note) })
}

// LatestCheckpoint implements engine.Rows.
func (s *Store) LatestCheckpoint(ctx context.Context) (uint64, []byte, error) {
	var size uint64
	var note []byte
	err := s.db.View(func(tx *bbolt.Tx) error {
		k, v := tx.Bucket(bucketAuditCheckpoints).Cursor().Last()
		if k == nil {
			return &kms.Error{Kind: kms.KindNotFound, Msg: "no audit checkpoint yet"}
		}
		body, _, err := s.auth.Open(recPath(bucketAuditCheckpoints, k), v)
		if err != nil {
			return err
		}
		size, note = binary.BigEndian.Uint64(k), append([]byte(nil), body...)
		return nil
	})
	return size, note, err
}

// Audit is the store's audit log (a kms.AuditStore).
func (s *Store) Audit() *engine.Log { return s.audit }

// Commits counts the bbolt transactions committed so far (bbolt makes two
// fdatasync calls per commit: pages, then the meta page).
func (s *Store) Commits() uint64 { return s.commits.Load() }

// Fsyncs counts the fsync-class calls made for commits: two per bbolt
// commit, one per journal frame.
func (s *Store) Fsyncs() uint64 { return 2*s.commits.Load() + s.audit.JournalSyncs() }
