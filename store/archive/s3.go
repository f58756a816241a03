package archive

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/minio/minio-go/v7"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/internal/s3conn"
	"github.com/kmsd-project/kmsd/kms"
)

// S3Config is an archive in an S3-compatible bucket, under Prefix
// (ending in "/", or empty).
type S3Config struct {
	s3conn.Config
	Bucket string
	Prefix string
}

// S3 is an archive in an S3-compatible bucket.
type S3 struct {
	c      *minio.Client
	bucket string
	prefix string
}

// OpenS3 connects and checks that the bucket exists.
func OpenS3(ctx context.Context, cfg S3Config) (*S3, error) {
	c, err := s3conn.Open(ctx, cfg.Config, cfg.Bucket)
	if err != nil {
		return nil, fmt.Errorf("s3 archive: %w", err)
	}
	return &S3{c: c, bucket: cfg.Bucket, prefix: cfg.Prefix}, nil
}

func (s *S3) String() string { return "s3://" + s.bucket + "/" + s.prefix }

func (s *S3) name(path string) (string, error) {
	if _, err := layout.Parse(path); err != nil {
		return "", fmt.Errorf("%w: %q", err, path)
	}
	return s.prefix + path, nil
}

// Put uploads data and reads it back (S3 answers a PUT once the object is
// durable; the read-back checks the bytes stored are these). An immutable
// resource already there is compared, never overwritten.
func (s *S3) Put(ctx context.Context, path string, data []byte, immutable bool) error {
	name, err := s.name(path)
	if err != nil {
		return err
	}
	if immutable {
		have, err := s.get(ctx, name)
		switch {
		case err == nil && bytes.Equal(have, data):
			return nil // written before (a Sync cut short)
		case err == nil:
			return fmt.Errorf("%w: %s", ErrConflict, path)
		case !errors.Is(err, kms.ErrNotFound):
			return err
		}
	}
	if _, err := s.c.PutObject(ctx, s.bucket, name, bytes.NewReader(data), int64(len(data)), minio.PutObjectOptions{ContentType: "application/octet-stream"}); err != nil {
		return fmt.Errorf("s3 archive: put %s: %w", path, err)
	}
	back, err := s.get(ctx, name)
	if err != nil {
		return fmt.Errorf("s3 archive: read back %s: %w", path, err)
	}
	if sha256.Sum256(back) != sha256.Sum256(data) {
		return fmt.Errorf("s3 archive: %s reads back other bytes than were put", path)
	}
	return nil
}

func (s *S3) Get(ctx context.Context, path string) ([]byte, error) {
	name, err := s.name(path)
	if err != nil {
		return nil, err
	}
	return s.get(ctx, name)
}

func (s *S3) get(ctx context.Context, name string) ([]byte, error) {
	o, err := s.c.GetObject(ctx, s.bucket, name, minio.GetObjectOptions{})
	if err != nil {
		return nil, fmt.Errorf("s3 archive: get %s: %w", name, err)
	}
	defer o.Close()
	max := MaxSize(strings.TrimPrefix(name, s.prefix))
	b, err := io.ReadAll(io.LimitReader(o, max+1))
	if err != nil {
		if s3conn.NotFound(err) {
			return nil, kms.Wrap(kms.KindNotFound, "s3 archive", err)
		}
		return nil, fmt.Errorf("s3 archive: get %s: %w", name, err)
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("s3 archive: %s is more than such a resource can be (%d bytes)", name, max)
	}
	return b, nil
}
