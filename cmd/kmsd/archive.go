package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/archive"
)

// archiveS3 splits --audit-archive s3://BUCKET/PREFIX/ (ok false for a
// directory).
func archiveS3(v string) (bucket, prefix string, ok bool) {
	rest, ok := strings.CutPrefix(v, "s3://")
	if !ok {
		return "", "", false
	}
	bucket, prefix, _ = strings.Cut(rest, "/")
	return bucket, prefix, true
}

// checkArchive checks --audit-archive before anything touches the disk.
func checkArchive(c config) error {
	v := c.auditArchive
	if v == "" {
		return nil
	}
	if bucket, prefix, ok := archiveS3(v); ok {
		if c.s3Endpoint == "" {
			return errors.New("--audit-archive s3://...: needs --s3-endpoint (and the credentials the HE blobs use)")
		}
		if !s3BucketRE.MatchString(bucket) {
			return fmt.Errorf("--audit-archive: %q is not a bucket name: 3 to 63 lower-case letters, digits, '.' or '-'", clipFlag(bucket))
		}
		if prefix != "" && (!s3PrefixRE.MatchString(prefix) || len(prefix) > 256) {
			return fmt.Errorf("--audit-archive: the prefix %q: want path segments of letters, digits, '.', '_' or '-', each followed by '/' (e.g. s3://%s/kmsd/audit/)", clipFlag(prefix), bucket)
		}
		return nil
	}
	if strings.Contains(v, "://") {
		return fmt.Errorf("--audit-archive %q: want a directory or s3://BUCKET/PREFIX/", clipFlag(v))
	}
	if fi, err := os.Stat(v); err == nil && !fi.IsDir() {
		return fmt.Errorf("--audit-archive %s is not a directory", v)
	}
	return nil
}

// openArchive opens the audit archive; nil without --audit-archive.
func openArchive(ctx context.Context, c config, getenv func(string) string) (archive.Bucket, error) {
	v := c.auditArchive
	if v == "" {
		return nil, nil
	}
	bucket, prefix, ok := archiveS3(v)
	if !ok {
		dir, err := filepath.Abs(v)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("--audit-archive: %w", err)
		}
		return archive.Dir{Root: dir}, nil
	}
	conn, err := s3Conn(c, getenv)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	b, err := archive.OpenS3(ctx, archive.S3Config{Config: conn, Bucket: bucket, Prefix: prefix})
	if err != nil {
		return nil, fmt.Errorf("--audit-archive: %w", err)
	}
	return b, nil
}

// logGrowth says at start how fast the audit log has grown in the store
// (records a day since its first record) when nothing leaves it: without
// --audit-retain the store holds every record for ever.
func logGrowth(ctx context.Context, l kms.AuditStore, log *slog.Logger) {
	size, err := l.AuditSize(ctx)
	if err != nil || size < 2 {
		return
	}
	recs, err := l.AuditRecords(ctx, 0, 1)
	if err != nil {
		return
	}
	first, err := kms.DecodeAuditRecord(recs[0])
	if err != nil {
		return
	}
	t, err := time.Parse(time.RFC3339Nano, first.Time)
	if err != nil {
		return
	}
	days := time.Since(t).Hours() / 24
	if days < 1.0/24 {
		return // under an hour of history says little
	}
	log.Info("audit log: the store keeps every record (no --audit-retain); at the pace since its first record it grows by this many records a day",
		"records", size, "since", first.Time, "records_per_day", int64(math.Round(float64(size)/days)))
}
