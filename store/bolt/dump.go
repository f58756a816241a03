package bolt

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	bbolt "go.etcd.io/bbolt"

	"github.com/kmsd-project/kmsd/internal/fileutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

var (
	_ store.Dumper = (*Store)(nil)
	_ store.Loader = conn{}
)

// Dump implements store.Dumper: the records the audit journal holds move
// into the file first, then one read transaction sends everything, each
// record's tag checked.
//
// The read transaction writes into a spool file beside kms.db, which is
// then sent on: it lasts as long as the disk takes, not as long as the
// backup's reader (bbolt cannot grow the file while a read transaction
// is open, so a slow reader would stall every write).
func (s *Store) Dump(ctx context.Context, to store.Sink) error {
	if err := s.WriteAudit(ctx, nil); err != nil {
		return fmt.Errorf("move the audit journal into kms.db: %w", err)
	}
	if err := s.auth.Check(); err != nil {
		return err
	}
	spool, err := storekit.NewSpool(filepath.Dir(s.db.Path()))
	if err != nil {
		return fmt.Errorf("a spool file for the dump: %w", err)
	}
	defer spool.Close()
	if err := s.dump(ctx, spool); err != nil {
		return err
	}
	return spool.Replay(to)
}

func (s *Store) dump(ctx context.Context, to store.Sink) error {
	return s.db.View(func(tx *bbolt.Tx) error {
		// What is dumped adds up to the store digest: a record put back
		// is found here, not laundered into a signed backup.
		var rep storekit.ScrubReport
		if err := s.scrubTx(ctx, tx, &rep); err != nil {
			if t := storekit.AsTamper(err); t != nil {
				s.auth.Break(t)
			}
			return err
		}
		open := func(bucket, k, v []byte) ([]byte, error) {
			body, _, err := s.auth.Open(recPath(bucket, k), v)
			return body, err
		}
		c := tx.Bucket(bucketMeta).Cursor()
		for k, v := c.Seek([]byte("x-")); k != nil && bytes.HasPrefix(k, []byte("x-")); k, v = c.Next() {
			body, err := open(bucketMeta, k, v)
			if err != nil {
				return err
			}
			if err := to.Meta(string(k[2:]), body); err != nil {
				return err
			}
		}
		vc := tx.Bucket(bucketVersions).Cursor()
		err := tx.Bucket(bucketKeys).ForEach(func(k, v []byte) error {
			body, err := open(bucketKeys, k, v)
			if err != nil {
				return err
			}
			key, err := decodeKey(body)
			if err != nil {
				return err
			}
			if err := to.Key(key); err != nil {
				return err
			}
			prefix := append(append([]byte(nil), k...), 0)
			for vk, vv := vc.Seek(prefix); vk != nil && bytes.HasPrefix(vk, prefix) && len(vk) == len(prefix)+8; vk, vv = vc.Next() {
				body, err := open(bucketVersions, vk, vv)
				if err != nil {
					return err
				}
				var ver kms.Version
				if err := json.Unmarshal(body, &ver); err != nil {
					return fmt.Errorf("version %x: %w", vk, err)
				}
				if err := to.Version(key.Name, &ver); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketTokens).ForEach(func(k, v []byte) error {
			body, err := open(bucketTokens, k, v)
			if err != nil {
				return err
			}
			t, err := decodeToken(body)
			if err != nil {
				return err
			}
			return to.Token(t)
		})
		if err != nil {
			return err
		}
		end, err := auditSize(tx)
		if err != nil {
			return err
		}
		pruned, err := prunedBelow(s.auth, tx)
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketAuditRecords).ForEach(func(k, v []byte) error {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			body, err := open(bucketAuditRecords, k, v)
			if err != nil {
				return err
			}
			return to.AuditRow(binary.BigEndian.Uint64(k), body)
		})
		if err != nil {
			return err
		}
		if err := to.AuditEnd(end, pruned); err != nil {
			return err
		}
		if k, v := tx.Bucket(bucketAuditCheckpoints).Cursor().Last(); k != nil {
			body, err := open(bucketAuditCheckpoints, k, v)
			if err != nil {
				return err
			}
			if err := to.Checkpoint(binary.BigEndian.Uint64(k), body); err != nil {
				return err
			}
		}
		return nil
	})
}

// ErrTargetNotEmpty: a load into a data dir that holds a store.
var ErrTargetNotEmpty = errors.New("the data dir already holds a kms.db: a restore goes into a data dir without one (move it away first); nothing was changed")

// Load implements store.Loader: the content goes into a new file beside
// kms.db, in one transaction, which becomes kms.db by a rename once it is
// complete and durable. Until then kms.db does not exist, so an
// interrupted load leaves the data dir as it was (with a leftover
// kms.db.restore-* file, removed by the next load).
func (c conn) Load(ctx context.Context, sealer kms.Sealer, feed func(store.Sink) error, finish func(store.Backend) error) (err error) {
	for _, p := range []string{c.path, c.path + "-audit-wal"} {
		if _, err := os.Lstat(p); err == nil {
			if p != c.path {
				return fmt.Errorf("the data dir holds %s, the audit journal of a store that is not there: move it away with its kms.db; nothing was changed", filepath.Base(p))
			}
			return ErrTargetNotEmpty
		} else if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	dir := filepath.Dir(c.path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	old, _ := filepath.Glob(c.path + ".restore-*")
	for _, f := range old {
		os.Remove(f)
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := c.path + ".restore-" + hex.EncodeToString(rnd[:])
	defer func() {
		if err != nil {
			os.Remove(tmp)
			os.Remove(tmp + "-audit-wal")
		}
	}()
	s, err := Open(tmp, Options{AuditWALSize: c.cfg.AuditWALSize, Sealer: sealer})
	if err != nil {
		return err
	}
	l := &loader{s: s}
	err = s.update(func(r *rtx) error {
		l.r = r
		return feed(l)
	})
	if err == nil && l.end != l.rowsEnd {
		err = fmt.Errorf("the dump's audit rows end at %d, its end says %d", l.rowsEnd, l.end)
	}
	if cerr := s.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if len(l.pending) > 0 || finish != nil {
		// Records the source had not made rows yet follow the rows: the
		// engine gives them their indexes, reopened on the rows loaded;
		// then the caller finishes the store, still under its temporary
		// name.
		if s, err = Open(tmp, Options{AuditWALSize: c.cfg.AuditWALSize, Sealer: sealer}); err != nil {
			return err
		}
		if len(l.pending) > 0 {
			if err = s.WriteAudit(ctx, l.pending); err != nil {
				err = fmt.Errorf("append the dump's pending audit records: %w", err)
			}
		}
		if err == nil && finish != nil {
			err = finish(s)
		}
		if cerr := s.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	// Linked, not renamed: a kms.db or journal that appeared meanwhile
	// is never replaced. The journal goes first: a kms.db is never
	// without the journal it was closed with.
	if err := os.Link(tmp+"-audit-wal", c.path+"-audit-wal"); err != nil {
		return fmt.Errorf("%w (%v)", ErrTargetNotEmpty, err)
	}
	if err := os.Link(tmp, c.path); err != nil {
		os.Remove(c.path + "-audit-wal")
		return fmt.Errorf("%w (%v)", ErrTargetNotEmpty, err)
	}
	os.Remove(tmp)
	os.Remove(tmp + "-audit-wal")
	return fileutil.SyncDir(dir)
}

// loader writes a dump into one transaction of a new file.
type loader struct {
	s       *Store
	r       *rtx
	end     uint64
	rowsEnd uint64
	pending []*kms.AuditRecord
}

func (l *loader) Meta(name string, value []byte) error {
	return l.r.put(bucketMeta, []byte("x-"+name), value)
}

func (l *loader) Key(k *kms.Key) error {
	if l.r.Bucket(bucketKeys).Get([]byte(k.Name)) != nil {
		return fmt.Errorf("the dump holds key %q twice", k.Name)
	}
	return putHeader(l.r, k)
}

func (l *loader) Version(key string, v *kms.Version) error {
	if l.r.Bucket(bucketKeys).Get([]byte(key)) == nil {
		return fmt.Errorf("the dump holds a version of key %q before the key", key)
	}
	return putVersion(l.r, key, v, nil)
}

func (l *loader) Token(t *kms.Token) error {
	buf, err := json.Marshal(t)
	if err != nil {
		return err
	}
	return l.r.put(bucketTokens, []byte(t.ID), buf)
}

func (l *loader) AuditRow(index uint64, row []byte) error {
	if index < l.rowsEnd {
		return fmt.Errorf("the dump's audit rows are out of order at %d", index)
	}
	l.r.Bucket(bucketAuditRecords).FillPercent = 1.0
	l.rowsEnd = index + 1
	return l.r.put(bucketAuditRecords, u64(index), row)
}

func (l *loader) AuditEnd(end, prunedBelow uint64) error {
	if end < l.rowsEnd || prunedBelow > end {
		return fmt.Errorf("the dump's audit end %d (pruned below %d) does not fit its rows", end, prunedBelow)
	}
	l.end = end
	if end > 0 {
		if err := l.r.put(bucketMeta, keyAuditEnd, u64(end)); err != nil {
			return err
		}
	}
	if prunedBelow > 0 {
		return l.r.put(bucketMeta, keyAuditPruned, u64(prunedBelow))
	}
	return nil
}

func (l *loader) Checkpoint(size uint64, note []byte) error {
	return l.r.put(bucketAuditCheckpoints, u64(size), note)
}

func (l *loader) Pending(recs [][]byte) error {
	var err error
	l.pending, err = storekit.AddPending(l.pending, recs)
	return err
}

// Driver names the driver, for a backup's header.
func (s *Store) Driver() string { return "bolt" }
