package storekit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"

	"github.com/kmsd-project/kmsd/kms"
)

// Spool is a store.Sink (the method set, without the import) that keeps
// what a dump sends in a temporary file, so that a dump's read
// transaction ends at disk speed, whatever pace its reader takes: Replay
// then sends it on. Close removes the file.
//
// The file is unlinked as soon as it is made (no path leads to it), and
// what is read back must hash to what was written (SHA-256 kept in
// memory): whoever can write the data dir cannot slip a record into what
// a dump sends, which a backup then signs.
type Spool struct {
	f     *os.File
	w     *bufio.Writer
	wrote hash.Hash
	err   error
}

// NewSpool makes a spool file in dir.
func NewSpool(dir string) (*Spool, error) {
	f, err := os.CreateTemp(dir, ".dump-spool-*")
	if err != nil {
		return nil, err
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, err
	}
	h := sha256.New()
	return &Spool{f: f, w: bufio.NewWriterSize(io.MultiWriter(f, h), 1<<20), wrote: h}, nil
}

// Close closes (and so frees) the spool file.
func (s *Spool) Close() { s.f.Close() }

func (s *Spool) put(kind byte, v any) error {
	if s.err != nil {
		return s.err
	}
	b, err := json.Marshal(v)
	if err != nil {
		s.err = err
		return err
	}
	var hd [5]byte
	hd[0] = kind
	binary.BigEndian.PutUint32(hd[1:], uint32(len(b)))
	if _, err := s.w.Write(hd[:]); err != nil {
		s.err = err
		return err
	}
	_, s.err = s.w.Write(b)
	return s.err
}

type spoolMeta struct {
	Name  string
	Value []byte
}

type spoolVersion struct {
	Key     string
	Version *kms.Version
}

type spoolRow struct {
	Index uint64
	Row   []byte
}

type spoolPair struct{ A, B uint64 }

type spoolCheckpoint struct {
	Size uint64
	Note []byte
}

func (s *Spool) Meta(name string, value []byte) error { return s.put('M', spoolMeta{name, value}) }
func (s *Spool) Key(k *kms.Key) error                 { return s.put('K', k) }
func (s *Spool) Version(key string, v *kms.Version) error {
	return s.put('V', spoolVersion{key, v})
}
func (s *Spool) Token(t *kms.Token) error               { return s.put('T', t) }
func (s *Spool) AuditRow(i uint64, row []byte) error    { return s.put('R', spoolRow{i, row}) }
func (s *Spool) AuditEnd(end, pruned uint64) error      { return s.put('A', spoolPair{end, pruned}) }
func (s *Spool) Checkpoint(n uint64, note []byte) error { return s.put('C', spoolCheckpoint{n, note}) }
func (s *Spool) Pending(recs [][]byte) error            { return s.put('P', recs) }

// SpoolSink is what Replay sends to (store.Sink).
type SpoolSink interface {
	Meta(name string, value []byte) error
	Key(k *kms.Key) error
	Version(key string, v *kms.Version) error
	Token(t *kms.Token) error
	AuditRow(index uint64, row []byte) error
	AuditEnd(end, prunedBelow uint64) error
	Checkpoint(size uint64, note []byte) error
	Pending(recs [][]byte) error
}

// Replay sends what the spool holds to to, in order.
func (s *Spool) Replay(to SpoolSink) error {
	if s.err != nil {
		return s.err
	}
	if err := s.w.Flush(); err != nil {
		return err
	}
	if _, err := s.f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	read := sha256.New()
	r := bufio.NewReaderSize(io.TeeReader(s.f, read), 1<<20)
	for {
		var hd [5]byte
		if _, err := io.ReadFull(r, hd[:]); errors.Is(err, io.EOF) {
			if !bytes.Equal(read.Sum(nil), s.wrote.Sum(nil)) {
				return errors.New("spool: the dump's spool file was changed while it was sent on (whoever writes the data dir?): the dump is refused")
			}
			return nil
		} else if err != nil {
			return err
		}
		b := make([]byte, binary.BigEndian.Uint32(hd[1:]))
		if _, err := io.ReadFull(r, b); err != nil {
			return err
		}
		var err error
		switch hd[0] {
		case 'M':
			var m spoolMeta
			if err = json.Unmarshal(b, &m); err == nil {
				err = to.Meta(m.Name, m.Value)
			}
		case 'K':
			var k kms.Key
			if err = json.Unmarshal(b, &k); err == nil {
				err = to.Key(&k)
			}
		case 'V':
			var v spoolVersion
			if err = json.Unmarshal(b, &v); err == nil {
				err = to.Version(v.Key, v.Version)
			}
		case 'T':
			var t kms.Token
			if err = json.Unmarshal(b, &t); err == nil {
				err = to.Token(&t)
			}
		case 'R':
			var row spoolRow
			if err = json.Unmarshal(b, &row); err == nil {
				err = to.AuditRow(row.Index, row.Row)
			}
		case 'A':
			var p spoolPair
			if err = json.Unmarshal(b, &p); err == nil {
				err = to.AuditEnd(p.A, p.B)
			}
		case 'C':
			var c spoolCheckpoint
			if err = json.Unmarshal(b, &c); err == nil {
				err = to.Checkpoint(c.Size, c.Note)
			}
		case 'P':
			var recs [][]byte
			if err = json.Unmarshal(b, &recs); err == nil {
				err = to.Pending(recs)
			}
		default:
			err = fmt.Errorf("spool: record kind %q", hd[0])
		}
		if err != nil {
			return err
		}
	}
}

// MaxPending bounds the audit records a dump may hold beside the rows (a
// replicated store's groups not sealed yet: a handful).
const MaxPending = 1 << 16

// AddPending decodes a dump's pending records onto have, at most
// MaxPending in all: what a loader appends through the audit log.
func AddPending(have []*kms.AuditRecord, recs [][]byte) ([]*kms.AuditRecord, error) {
	if len(have)+len(recs) > MaxPending {
		return have, fmt.Errorf("the dump holds more than %d audit records not made rows yet", MaxPending)
	}
	for _, b := range recs {
		r, err := kms.DecodeAuditRecord(b)
		if err != nil {
			return have, fmt.Errorf("a pending audit record of the dump: %w", err)
		}
		have = append(have, r)
	}
	return have, nil
}
