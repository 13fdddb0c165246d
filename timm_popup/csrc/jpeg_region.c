/* One region of a JPEG decoded with libjpeg-turbo, the rest of the image left undecoded.

   A training crop (RandomResizedCrop) covers 8-100% of an image, yet a full decode pays the inverse DCT, the
   chroma upsampling and the colour conversion of every pixel. libjpeg-turbo's partial decompression skips them
   outside the region: jpeg_skip_scanlines for the rows above it (their Huffman data is still read, as it must be),
   jpeg_crop_scanline for the columns beside it (widened to the iMCU grid and by one column), and the rows below it
   are never read.
   Inside the region the pixels are those of a full decode (tests/test_pipeline.py compares them).

   No Python package exposes this (torchvision, Pillow, simplejpeg and PyTurboJPEG decode whole images), so it is
   written here, against the system's libjpeg, compiled on first use like csrc/popup_kernels.c. */

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

enum { REGION_OK = 0, REGION_UNSUPPORTED = 1, REGION_ERROR = 2 };

struct region_error {
    struct jpeg_error_mgr mgr;
    jmp_buf jump;
    char *message; /* JMSG_LENGTH_MAX bytes, the caller's */
};

static void region_fail(j_common_ptr cinfo) {
    struct region_error *err = (struct region_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* A warning (corrupt or truncated data) fails the region too: the caller falls back to the decoders that name
   the file or read what they can, as a full decode of it would. */
static void region_message(j_common_ptr cinfo, int level) {
    if (level < 0) region_fail(cinfo);
}

/* Version of this file's interface, checked by the loader. */
int jpeg_region_version(void) { return 1; }

/* Decode rows [top, top + height) and columns [left, left + width) of the JPEG in data[0:size], at 1/scale of its
   size (scale 1, 2, 4 or 8: libjpeg's DCT scaling; the region is in scaled pixels), as `channels` (1: grey, 3: RGB)
   interleaved 8-bit samples: height * width * channels bytes at `out`, row after row. A decoded row is wider than
   the region (the iMCU grid), so `capacity` must leave room for one: height * width * channels + 64 * channels.
   Returns REGION_OK; REGION_UNSUPPORTED for what this decoder leaves to others (CMYK/YCCK, a region outside the
   scaled image, too small a buffer); REGION_ERROR with `message` for data libjpeg cannot read. */
int jpeg_region_decode(const unsigned char *data, unsigned long size, int channels, int scale, int top, int left,
                       int height, int width, unsigned char *out, long capacity, char *message) {
    struct jpeg_decompress_struct cinfo;
    struct region_error err;
    volatile int status = REGION_OK;

    message[0] = '\0';
    cinfo.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = region_fail;
    err.mgr.emit_message = region_message;
    err.message = message;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_ERROR;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    if ((channels != 1 && channels != 3) || cinfo.jpeg_color_space == JCS_CMYK ||
        cinfo.jpeg_color_space == JCS_YCCK) {
        status = REGION_UNSUPPORTED;
        goto done;
    }
    cinfo.out_color_space = channels == 1 ? JCS_GRAYSCALE : JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale;
    jpeg_start_decompress(&cinfo);
    if (top < 0 || left < 0 || height < 1 || width < 1 || (JDIMENSION)(top + height) > cinfo.output_height ||
        (JDIMENSION)(left + width) > cinfo.output_width) {
        status = REGION_UNSUPPORTED;
        goto done;
    }
    /* One column more on each side where the image has it: the fancy (triangle) upsampling of chroma replicates
       the edge of a cropped row, so its last column would differ from a full decode's. */
    JDIMENSION x = left > 0 ? (JDIMENSION)left - 1 : 0;
    JDIMENSION w = (JDIMENSION)(left + width) - x + ((JDIMENSION)(left + width) < cinfo.output_width);
    if (w < cinfo.output_width) jpeg_crop_scanline(&cinfo, &x, &w);
    else x = 0, w = cinfo.output_width;
    long row_bytes = (long)width * channels, shift = (long)(left - (int)x) * channels;
    if (row_bytes * (height - 1) + (long)w * channels > capacity) {
        status = REGION_UNSUPPORTED;
        goto done;
    }
    if (top > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)top) != (JDIMENSION)top) {
        strcpy(message, "the image ends before the region");
        status = REGION_ERROR;
        goto done;
    }
    for (long r = 0; r < height; r++) {
        /* decoded in place, then the region's columns moved to the row's start: the decoded row's tail only
           overwrites the next row, not yet read */
        JSAMPROW row = out + r * row_bytes;
        if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) {
            strcpy(message, "the image ends before the region");
            status = REGION_ERROR;
            goto done;
        }
        if (shift) memmove(row, row + shift, (size_t)row_bytes);
    }
done:
    jpeg_destroy_decompress(&cinfo); /* aborts: the rows below the region are never decoded */
    return status;
}
